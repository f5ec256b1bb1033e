"""Integrated-gradients attributions of one output of a twin to each customer's events and fields.

What is attributed: the encoder's own intermediate tensors, swapped in by forward hooks so the
model's code runs unchanged (``attribution_slots``):

- per event: the event-type embedding (field ``type``), the day-of-week, day-of-month and hour
  embeddings (``calendar``), the standardised ``log1p`` amount (``amount``) and gap (``gap``;
  for the transformer also its elapsed-time features), each numeric extra (``numeric:NAME``)
  and each categorical field's embedding (``categorical:NAME``);
- per history (models with ``type_recency`` / ``history_summary``): the days since the last
  event of each type and the running summary (count, age, rate, mean gap, mean amount), both
  at every position, summed over positions;
- the silence since the last event (``days_since_last_event``; only the horizon outputs read it).

The reference, the point integrated from (``REFERENCE``): the same number of events, each the
*average event*: the mean embedding of the known event types, of each calendar table and of
each categorical field's known values; amount, gap and numeric extras at their calibration
means (0 once standardised); no event of any type seen before (the type-recency features at
their cap); the history summary at 0 (no count, age or rate, gap and amount means at the
calibration means); the elapsed-time features at 0; no silence. Integrated gradients (Captum, Gauss-Legendre quadrature) give
signed contributions whose sum is ``prediction - reference`` up to the quadrature error (the
convergence delta), which is checked per customer: ``|delta| <= rtol * max(|prediction -
reference|, 1e-3 * max(|prediction|, |reference|))``; customers over it are integrated again
with twice the steps, up to ``max_steps``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import Tensor, nn

from fintwin.data.contract import OUTPUT_NAMES
from fintwin.data.features import OOV_ID, FeaturiserSpec
from fintwin.errors import FintwinInputError
from fintwin.models.encoders import sequence_mask
from fintwin.models.module import TwinModule

log = logging.getLogger(__name__)

REFERENCE = (
    "the twin's output for a history of as many average events: mean embeddings of the known "
    "event types, calendar values and categorical values, amount, gap and numeric extras at "
    "their calibration means, no type seen before, an empty history summary, no silence"
)
EVENT_FIELDS = ("type", "amount", "gap", "calendar")
SUMMARY_FEATURES = ("count", "age", "rate", "mean_gap", "mean_amount")  # HistorySummary order
SILENCE_INPUT = "days_since_last_event"
SILENCE_OUTPUTS = ("horizon_count", "horizon_spend")  # the outputs that read the silence
UNATTRIBUTABLE = {"next_time_quantiles": "the quantiles are found by bisection, a step function "
                  "of the inputs without gradients; explain next_time_mean instead"}
RTOL = 1e-3
START_STEPS = 8
MAX_STEPS = 512
MAX_POSITIONS = 1 << 16  # interpolated rows x events per forward (memory bound)
TOP_TYPE = -1  # output index: each customer's most probable next event type


@dataclass(frozen=True)
class OutputSelector:
    """One scalar per customer out of the contract's outputs: ``name``, and for a vector output
    the element ``index`` (``TOP_TYPE``: each customer's most probable next type)."""

    name: str
    index: int | None
    label: str

    def select(self, outputs: Mapping[str, Tensor], index: Tensor) -> Tensor:
        """``[B]`` values of this output; ``index`` ``[B]`` holds each row's element."""
        value = outputs[self.name]
        return value if value.dim() == 1 else value.gather(1, index[:, None])[:, 0]

    def indices(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """``[B]`` element of each row (each row's most probable known type for ``TOP_TYPE``)."""
        value = outputs[self.name]
        if self.index != TOP_TYPE:
            return torch.full((value.shape[0],), self.index or 0, dtype=torch.long)
        return value[:, OOV_ID + 1 :].argmax(dim=1) + OOV_ID + 1


def parse_output(text: str, spec: FeaturiserSpec) -> OutputSelector:
    """``churn_prob``, ``horizon_spend``, ``horizon_count``, ``next_time_mean``,
    ``dormant_prob``, ``next_amount_mean`` or ``next_event_probs[:TYPE]`` (default: each
    customer's most probable type); ``FintwinInputError`` naming what is accepted otherwise."""
    name, _, key = text.partition(":")
    accepted = ", ".join("next_event_probs[:TYPE]" if n == "next_event_probs" else n
                         for n in OUTPUT_NAMES if n not in UNATTRIBUTABLE)
    if name not in OUTPUT_NAMES:
        raise FintwinInputError(f"unknown output {text!r}; expected one of {accepted}")
    if name == "next_event_probs":
        if not key:
            return OutputSelector(name, TOP_TYPE, "next_event_probs[most probable type]")
        ids = spec.vocab.to_dict()
        if key not in ids:
            raise FintwinInputError(
                f"output {text!r}: unknown event type {key!r}; the model knows {sorted(ids)}")
        return OutputSelector(name, ids[key], f"next_event_probs[{key}]")
    if name in UNATTRIBUTABLE:
        raise FintwinInputError(f"output {name!r} cannot be explained: {UNATTRIBUTABLE[name]}")
    if key:
        raise FintwinInputError(f"output {name!r} is one number per customer; drop ':{key}'")
    return OutputSelector(name, None, name)




@dataclass(frozen=True)
class Slot:
    """An attributed tensor: the output of ``module`` (or its input, ``on_input``) and its
    reference, a function of the actual tensor."""

    name: str
    module: nn.Module
    on_input: bool
    reference: Callable[[Tensor], Tensor]


def _mean_row(weight: Tensor, first: int) -> Callable[[Tensor], Tensor]:
    """Reference: the mean of embedding rows ``first..`` (every known value)."""
    return lambda actual: weight[first:].detach().mean(dim=0).expand_as(actual)


def _zeros(actual: Tensor) -> Tensor:
    return torch.zeros_like(actual)


def attribution_slots(model: TwinModule) -> list[Slot]:
    """The attributed tensors of ``model``'s encoder, in a fixed order."""
    encoder = model.encoder
    embedding = encoder.embedding
    slots = [
        Slot("type", embedding.type_embedding, False,
             _mean_row(embedding.type_embedding.weight, OOV_ID + 1)),
        Slot("day_of_week", embedding.day_of_week_embedding, False,
             _mean_row(embedding.day_of_week_embedding.weight, 0)),
        Slot("day_of_month", embedding.day_of_month_embedding, False,
             _mean_row(embedding.day_of_month_embedding.weight, 1)),
        Slot("hour", embedding.hour_embedding, False, _mean_row(embedding.hour_embedding.weight, 0)),
        Slot("values", embedding.value_projection, True, _zeros),
    ]
    for field, table in enumerate(embedding.categorical_embeddings):
        known = OOV_ID + 1 if table.num_embeddings > OOV_ID + 1 else OOV_ID
        slots.append(Slot(f"categorical{field}", table, False, _mean_row(table.weight, known)))
    if encoder.recency is not None:  # features of "never seen": every type at the cap
        slots.append(Slot("recency", encoder.recency.projection, True, torch.ones_like))
    if encoder.summary is not None:
        slots.append(Slot("summary", encoder.summary.projection, True, _zeros))
    if hasattr(encoder, "time_projection"):
        slots.append(Slot("time", encoder.time_projection, True, _zeros))
    return slots


class _Hooks:
    """Forward hooks on the slots' modules: record their tensors, or swap in given ones."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = slots
        self.recorded: dict[str, Tensor] = {}
        self.swap: dict[str, Tensor] | None = None

    def _value(self, name: str, actual: Tensor) -> Tensor | None:
        if self.swap is None:
            self.recorded[name] = actual.detach()
            return None
        return self.swap[name]

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Hooks]:
        handles = []
        for slot in self.slots:
            if slot.on_input:
                def hook(module, args, name=slot.name):
                    value = self._value(name, args[0])
                    return None if value is None else (value, *args[1:])
                handles.append(slot.module.register_forward_pre_hook(hook))
            else:
                def hook(module, args, output, name=slot.name):
                    return self._value(name, output)
                handles.append(slot.module.register_forward_hook(hook))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class Attributions:
    """Attributions of one output for a batch of ``B`` customers padded to ``T`` events.

    ``events`` ``[B, T, len(fields)]``: per event and field (``fields``: ``EVENT_FIELDS``, then
    ``numeric:NAME`` and ``categorical:NAME``); zero at padding. ``recency`` ``[B, V]`` per event
    type id (or None), ``summary`` ``[B, 5]`` per ``SUMMARY_FEATURES`` (or None), ``silence``
    ``[B]``. Their sum is ``prediction - reference - delta``; ``steps`` the quadrature steps used.
    """

    fields: list[str]
    events: np.ndarray
    recency: np.ndarray | None
    summary: np.ndarray | None
    silence: np.ndarray
    prediction: np.ndarray
    reference: np.ndarray
    delta: np.ndarray
    steps: np.ndarray
    index: np.ndarray

    def total(self) -> np.ndarray:
        """``[B]`` sum of every attribution."""
        parts = [self.events.sum(axis=(1, 2)), self.silence]
        parts += [part.sum(axis=1) for part in (self.recency, self.summary) if part is not None]
        return np.sum(parts, axis=0)

    def converged(self, rtol: float = RTOL) -> np.ndarray:
        """``[B]`` whether completeness holds within ``rtol`` (module doc)."""
        return np.abs(self.delta) <= tolerance(self.prediction, self.reference, rtol)


def tolerance(prediction: np.ndarray, reference: np.ndarray, rtol: float = RTOL) -> np.ndarray:
    """Largest accepted convergence delta (module doc)."""
    scale = np.maximum(np.abs(prediction - reference),
                       1e-3 * np.maximum(np.abs(prediction), np.abs(reference)))
    return rtol * np.maximum(scale, 1e-12)


class Attributor:
    """Integrated gradients of one output of ``model`` (eval mode, CPU or its device).

    ``numeric`` and ``categorical``: the featuriser's extra column names (field labels).
    """

    def __init__(self, model: TwinModule, numeric: Sequence[str] = (),
                 categorical: Sequence[str] = (), *, start_steps: int = START_STEPS,
                 max_steps: int = MAX_STEPS, rtol: float = RTOL) -> None:
        self.model = model.eval()
        self.slots = attribution_slots(model)
        self.hooks = _Hooks(self.slots)
        self.numeric, self.categorical = list(numeric), list(categorical)
        self.fields = [*EVENT_FIELDS, *(f"numeric:{n}" for n in self.numeric),
                       *(f"categorical:{n}" for n in self.categorical)]
        self.start_steps, self.max_steps, self.rtol = start_steps, max_steps, rtol
        self._keys: list[str] = []
        self._silent = False
        self._selector: OutputSelector | None = None

    def attribute(self, batch: Mapping[str, Tensor], selector: OutputSelector) -> Attributions:
        """Attributions of ``selector`` for every row of a model ``batch`` (the contract's
        inputs, ``days_since_last_event`` included)."""
        batch = {key: value for key, value in batch.items() if key != SILENCE_INPUT} | {
            SILENCE_INPUT: batch[SILENCE_INPUT].float()}
        self._silent = selector.name in SILENCE_OUTPUTS  # the silence is attributed
        self._keys = [key for key in batch if key != SILENCE_INPUT or not self._silent]
        self._selector = selector
        with self.hooks.installed():
            self.hooks.swap = None
            with torch.no_grad():
                outputs = self.model.predict_last(batch, [selector.name])
            index = selector.indices(outputs)
            actual = {**self.hooks.recorded}
            mask = sequence_mask(batch["length"], batch["event_type"].shape[1])
            inputs = tuple(actual[s.name] for s in self.slots)
            references = tuple(self._reference(s, actual[s.name], mask) for s in self.slots)
            if self._silent:
                inputs += (batch[SILENCE_INPUT][:, None],)
                references += (torch.zeros_like(inputs[-1]),)
            extra = (index, *(batch[key] for key in self._keys))
            with torch.no_grad():  # both ends in one forward
                ends = self._forward(*(torch.cat([a, b]) for a, b in zip(inputs, references,
                                                                          strict=True)),
                                     *(torch.cat([t, t]) for t in extra))
            prediction, reference = ends.double().numpy().reshape(2, -1)
            return self._integrate(inputs, references, extra, prediction, reference, index)

    @staticmethod
    def _reference(slot: Slot, actual: Tensor, mask: Tensor) -> Tensor:
        """The slot's reference at real positions, the actual tensor at padding (so padding
        is attributed nothing)."""
        reference = slot.reference(actual)
        view = mask.view(*mask.shape, *([1] * (actual.dim() - 2)))
        return torch.where(view, reference, actual)

    def _forward(self, *tensors: Tensor) -> Tensor:
        """``[N]`` selected output for swapped-in slot tensors, the silence ``[N, 1]`` when it
        is attributed, then the row indices and batch tensors (Captum repeats these along the
        interpolation steps)."""
        count = len(self.slots) + self._silent
        self.hooks.swap = dict(zip((s.name for s in self.slots), tensors[:count], strict=False))
        index, *rest = tensors[count:]
        batch = dict(zip(self._keys, rest, strict=True))
        if self._silent:
            batch[SILENCE_INPUT] = tensors[count - 1][:, 0]
        try:
            outputs = self.model.predict_last(batch, [self._selector.name])
            return self._selector.select(outputs, index)
        finally:
            self.hooks.swap = None

    def _integrate(self, inputs, references, extra, prediction, reference, index) -> Attributions:
        """Integrate every row with ``start_steps``, then the rows over the tolerance again
        with twice the steps until they pass or ``max_steps`` is reached."""
        rows = len(prediction)
        steps = np.full(rows, self.start_steps)
        result: list[np.ndarray] | None = None
        todo = np.arange(rows)
        n_steps = self.start_steps
        while True:
            pick = torch.from_numpy(todo)
            parts = self._run(tuple(t[pick] for t in inputs), tuple(t[pick] for t in references),
                              tuple(t[pick] for t in extra), n_steps)
            if result is None:
                result = parts
            else:
                for whole, part in zip(result, parts, strict=True):
                    whole[todo] = part
            steps[todo] = n_steps
            attributions = self._assemble(result, prediction, reference, steps, index)
            failing = todo[~attributions.converged(self.rtol)[todo]]
            if len(failing) == 0 or n_steps >= self.max_steps:
                break
            todo, n_steps = failing, n_steps * 2
        if len(failing):
            log.warning("completeness not reached for %d of %d customers at %d steps (worst "
                        "delta %.3g)", len(failing), rows, n_steps,
                        float(np.abs(attributions.delta[failing]).max()))
        return attributions

    def _run(self, inputs, references, extra, n_steps: int) -> list[np.ndarray]:
        rows, width = inputs[0].shape[:2]
        chunk = max(rows, (MAX_POSITIONS // max(width, 1)) // rows * rows)
        grads = IntegratedGradients(self._forward).attribute(
            inputs, baselines=references, additional_forward_args=extra, n_steps=n_steps,
            method="gausslegendre", internal_batch_size=chunk)
        return [g.detach().double().numpy() for g in grads]

    def _assemble(self, parts: list[np.ndarray], prediction, reference, steps,
                  index: Tensor) -> Attributions:
        by_name = dict(zip([s.name for s in self.slots] + [SILENCE_INPUT], parts, strict=False))
        calendar = sum(by_name[name].sum(axis=-1) for name in ("day_of_week", "day_of_month", "hour"))
        values = by_name["values"]
        gap = values[..., 1] + (by_name["time"].sum(axis=-1) if "time" in by_name else 0.0)
        columns = [by_name["type"].sum(axis=-1), values[..., 0], gap, calendar]
        columns += [values[..., 2 + i] for i in range(len(self.numeric))]
        columns += [by_name[f"categorical{i}"].sum(axis=-1) for i in range(len(self.categorical))]
        recency = by_name.get("recency")
        if recency is not None:  # [B, T, 2V]: logarithmic then linear feature of each type
            vocab = recency.shape[-1] // 2
            recency = (recency[..., :vocab] + recency[..., vocab:]).sum(axis=1)
        summary = by_name["summary"].sum(axis=1) if "summary" in by_name else None
        attributions = Attributions(
            fields=self.fields, events=np.stack(columns, axis=-1), recency=recency,
            summary=summary, silence=by_name[SILENCE_INPUT][:, 0] if self._silent else
            np.zeros(len(prediction)), prediction=prediction,
            reference=reference, delta=np.zeros_like(prediction), steps=steps.copy(),
            index=index.numpy())
        attributions.delta = attributions.total() - (prediction - reference)
        return attributions
