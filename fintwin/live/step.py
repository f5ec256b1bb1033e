"""The step model: one new event per customer -> the twin's new state and fresh predictions.

``StepModel(model, max_len)`` wraps a trained ``TwinModule``. Its input is a batch of (one
new event's raw fields as the full-history graph takes them at one position, the silence
``days_since_last_event`` the horizon outputs start after, the customers' states) and its
output the full-history graph's outputs under the same names (``fintwin.data.contract``)
followed by the new states. The state is a dict of named float32 / int64 arrays with fixed
per-customer shapes (``StepModel.layout``, a ``fintwin.live.store.StateLayout``):

- ``hidden`` ``[H]``: the encoder's hidden state at the last event (predictions can be
  read from the state alone);
- LSTM: ``h``, ``c`` ``[layers, H]``, the recurrent state;
- transformer: ``k``, ``v`` ``[layers, heads, max_len, head_dim]``, a ring buffer of the
  keys/values of the last ``max_len`` events (event ``n`` in slot ``n % max_len``),
  ``count`` ``[1]`` (events applied) and ``elapsed`` ``[2]`` (days since the first event);
- ``since`` ``[V, 2]`` (with ``type_recency``): days since the last event of each type,
  stored minus the recency cap; ``summary`` ``[5, 2]`` (with ``history_summary``): the
  running sums of ``HistorySummary``.

The running features are float64 in the encoder: ``elapsed``, ``since`` and ``summary`` keep
each float64 value as two float32 (``hi + lo``, about 48 bits). A new customer's state is
all zeros (``initial_state``), so anything holding the layout can make one.

Up to ``max_len`` events, stepping from the empty state gives the full-history model's
outputs after every event. Past ``max_len`` the full-history model reads only the last
``max_len`` events; the step model does not re-read them:

- LSTM: the recurrent state and the running features carry the whole history.
- transformer: the new event attends to the keys/values of the previous ``max_len - 1``
  events (the ring buffer), which were computed when those events arrived (with what came
  before them in view); its position code stays at the window's last position
  (``max_len - 1``, as in the full-history model's window) and its elapsed time counts from
  the customer's first event; the running features carry the whole history.

``divergence_past_max_len`` measures what this costs. ``bootstrap_states`` computes the
states of many customers from their histories in one batched pass per chunk, and
``export_step_model`` writes the step graph as one ONNX file checked against PyTorch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
from torch import Tensor, nn

from fintwin.data.contract import (
    BATCH_AXIS,
    MODEL_OUTPUTS,
    OUTPUT_NAMES,
    SEQUENCE_AXIS,
    random_inputs,
    sequence_inputs,
)
from fintwin.data.sequences import SequenceSet
from fintwin.export.graph import export_program, graph_signature
from fintwin.export.onnx import (
    PARITY_TOLERANCE,
    ExportParityError,
    ParityReport,
    ort_session,
    quiet_loggers,
)
from fintwin.files import atomic_path
from fintwin.live.store import StateLayout
from fintwin.models.checkpoint import TrainedTwin
from fintwin.models.encoders import (
    RECENCY_CAP_DAYS,
    HistorySummary,
    LSTMEncoder,
    State,
    TransformerEncoder,
)
from fintwin.models.module import TwinModule

log = logging.getLogger(__name__)

STATE_INPUT = "state_{}"  # graph input of a state field
STATE_OUTPUT = "new_state_{}"  # graph output of a state field after the step
DAYS_SINCE_INPUT = "days_since_last_event"
PAIR = 2  # a float64 value kept as two float32: hi, lo
BOOTSTRAP_BATCH = 1024  # customers per batched pass
# The predictive distribution's parameters, outputs of the step graph after the contract's:
# ``gap_mixture`` [3, M] (log weights, loc, log scale of log(gap) given a next event) and
# ``amount_params`` [3, V] (zero logit, loc, log scale of log(amount) per next type).
DISTRIBUTION_OUTPUTS = ("gap_mixture", "amount_params")
EXPORT_BATCH = 3  # example batch of the export (not 1: the exporter would fix the axis)
PARITY_BATCHES = (1, 4, 33)


def split_float64(values: Tensor) -> Tensor:
    """``[...]`` float64 -> ``[..., 2]`` float32 ``(hi, lo)`` with ``hi + lo`` ~= the value."""
    hi = values.float()
    return torch.stack([hi, (values - hi.double()).float()], dim=-1)


def join_float64(pairs: Tensor) -> Tensor:
    """``[..., 2]`` float32 ``(hi, lo)`` -> ``[...]`` float64."""
    return pairs[..., 0].double() + pairs[..., 1].double()


class RecurrentCarrier:
    """LSTM state: ``h`` and ``c`` ``[layers, H]``; history of any length, O(1) per event."""

    def __init__(self, encoder: LSTMEncoder) -> None:
        self.shape = (encoder.lstm.num_layers, encoder.hidden_size)

    def fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"h": (self.shape, "float32"), "c": (self.shape, "float32")}

    def step(self, encoder: LSTMEncoder, event: Mapping[str, Tensor], state: Mapping[str, Tensor],
             running: State) -> tuple[Tensor, State]:
        return encoder.step(event, {"h": state["h"], "c": state["c"]} | running)

    def stored(self, carried: State) -> State:
        return {"h": carried["h"], "c": carried["c"]}

    def from_prefix(self, prefix: State, length: Tensor) -> State:
        return prefix


class WindowCarrier:
    """Transformer state: a ring buffer of the last ``window`` events' keys/values, the
    number of events applied and the elapsed days (see the module docstring)."""

    def __init__(self, encoder: TransformerEncoder, window: int) -> None:
        heads = encoder.blocks[0].attn.num_heads
        self.window = window
        self.shape = (len(encoder.blocks), heads, window, encoder.hidden_size // heads)

    def fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {
            "k": (self.shape, "float32"),
            "v": (self.shape, "float32"),
            "count": ((1,), "int64"),
            "elapsed": ((PAIR,), "float32"),
        }

    def step(self, encoder: TransformerEncoder, event: Mapping[str, Tensor],
             state: Mapping[str, Tensor], running: State) -> tuple[Tensor, State]:
        """The new event attends to the valid slots but the one it is written to (the
        oldest event's, once the window is full) and to itself."""
        count = state["count"][:, 0]
        slot = torch.remainder(count, self.window)
        slots = torch.arange(self.window, device=count.device)
        cache = {
            "k": state["k"],
            "v": state["v"],
            "valid": (slots < count[:, None]) & (slots != slot[:, None]),
            "position": count.clamp(max=self.window - 1),
            "elapsed": join_float64(state["elapsed"]),
        }
        hidden, new = encoder.step(event, cache | running)
        index = slot.view(-1, 1, 1, 1, 1).expand(-1, *self.shape[:2], 1, self.shape[3])
        return hidden, new | {  # a scatter into the slot: ~1.5x faster than a masked where
            "k": state["k"].scatter(3, index, new["k"][..., -1:, :]),
            "v": state["v"].scatter(3, index, new["v"][..., -1:, :]),
            "count": count + 1,
        }

    def stored(self, carried: State) -> State:
        return {
            "k": carried["k"],
            "v": carried["v"],
            "count": carried["count"][:, None],
            "elapsed": split_float64(carried["elapsed"]),
        }

    def from_prefix(self, prefix: State, length: Tensor) -> State:
        """The prefix cache moved into the window (slots past each length zeroed)."""
        width = prefix["k"].shape[3]
        if width > self.window:
            raise ValueError(
                f"histories of {width} events are longer than the window of {self.window}: "
                "keep the last max_len events, as the full-history model does"
            )
        real = (torch.arange(self.window, device=length.device) < length[:, None])
        real = real[:, None, None, :, None]
        padding = (0, 0, 0, self.window - width)
        return prefix | {
            "k": torch.where(real, nn.functional.pad(prefix["k"], padding), 0.0),
            "v": torch.where(real, nn.functional.pad(prefix["v"], padding), 0.0),
            "count": length,
        }


def carrier_of(encoder: nn.Module, max_len: int) -> RecurrentCarrier | WindowCarrier:
    """How the encoder's state is carried from one event to the next."""
    if isinstance(encoder, LSTMEncoder):
        return RecurrentCarrier(encoder)
    if isinstance(encoder, TransformerEncoder):
        return WindowCarrier(encoder, max_len)
    raise TypeError(f"no step model for encoder {type(encoder).__name__}")


class StepModel(nn.Module):
    """One event per customer -> new states and the full-history model's outputs.

    ``forward`` takes, positionally in ``input_names`` order, the event's inputs (the
    contract's sequence inputs at one position: ``[B]``, ``numeric`` ``[B, F]``),
    ``days_since_last_event`` ``[B]`` and the state fields (``state_<name>``, in
    ``layout`` order), and returns the contract's outputs, the predictive distribution's
    parameters (``DISTRIBUTION_OUTPUTS``), then the new state fields (``new_state_<name>``),
    in ``output_names`` order.
    """

    def __init__(self, model: TwinModule, max_len: int) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"max_len={max_len}: expected a positive integer")
        self.model = model
        self.max_len = int(max_len)
        self.event_inputs = sequence_inputs(model.contract_sizes())
        self.carrier = carrier_of(model.encoder, self.max_len)
        self.running = tuple(model.encoder.running_inputs())  # names of the running features
        self.layout = StateLayout.of(self._fields())

    def _fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        running = {
            "since": ((self.model.hparams.vocab_size, PAIR), "float32"),
            "summary": ((HistorySummary.N_FEATURES, PAIR), "float32"),
        }
        return (
            self.carrier.fields()
            | {"hidden": ((self.model.encoder.hidden_size,), "float32")}
            | {name: running[name] for name in self.running}
        )

    @property
    def field_names(self) -> list[str]:
        return [spec.name for spec in self.layout.fields]

    @property
    def input_names(self) -> list[str]:
        events = [spec.name for spec in self.event_inputs]
        return events + [DAYS_SINCE_INPUT] + [STATE_INPUT.format(n) for n in self.field_names]

    @property
    def output_names(self) -> list[str]:
        return (list(OUTPUT_NAMES) + list(DISTRIBUTION_OUTPUTS)
                + [STATE_OUTPUT.format(n) for n in self.field_names])

    def distribution_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-customer shapes of the ``DISTRIBUTION_OUTPUTS``."""
        return {"gap_mixture": (3, self.model.time_head.n_components),
                "amount_params": (3, int(self.model.hparams.vocab_size))}

    def initial_state(self, batch_size: int) -> dict[str, np.ndarray]:
        """The state of ``batch_size`` customers without events: all zeros."""
        return {
            spec.name: np.zeros((batch_size, *spec.shape), spec.dtype) for spec in self.layout.fields
        }

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.input_names, tensors, strict=True))
        event = {spec.name: named[spec.name] for spec in self.event_inputs}
        state = {name: named[STATE_INPUT.format(name)] for name in self.field_names}
        outputs, new_state = self.step(event, named[DAYS_SINCE_INPUT], state)
        return tuple(outputs[name] for name in (*OUTPUT_NAMES, *DISTRIBUTION_OUTPUTS)) + tuple(
            new_state[name] for name in self.field_names
        )

    def step(self, event: Mapping[str, Tensor], days_since_last_event: Tensor,
             state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Outputs after one more event per row, and the new states."""
        hidden, carried = self.carrier.step(
            self.model.encoder, event, state, self._running_in(state)
        )
        return self.outputs(hidden, days_since_last_event), self._stored(carried, hidden)

    def states_after(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """States after each row's whole (right-padded) history, in one batched pass."""
        prefix = self.model.encoder.prefix_state(batch)
        return self._stored(self.carrier.from_prefix(prefix, batch["length"]), prefix["hidden"])

    def outputs(self, hidden: Tensor, days_since_last_event: Tensor) -> dict[str, Tensor]:
        """The contract's outputs from hidden states ``[B, H]`` (as ``predict_last``), and the
        predictive distribution's parameters (``DISTRIBUTION_OUTPUTS``)."""
        out = self.model.head_outputs(hidden, days_since_last_event)
        gap, amount = out.gap, out.amount
        return {
            "gap_mixture": torch.stack([gap.log_weights, gap.loc, gap.log_scale], dim=-2),
            "amount_params": torch.stack([amount.zero_logit, amount.loc, amount.log_scale], dim=-2),
        } | self.model.contract_outputs(out)

    def _running_in(self, state: Mapping[str, Tensor]) -> State:
        running = {name: join_float64(state[name]) for name in self.running}
        if "since" in running:
            running["since"] = running["since"] + RECENCY_CAP_DAYS
        return running

    def _stored(self, carried: State, hidden: Tensor) -> dict[str, Tensor]:
        running = {name: carried[name] for name in self.running}
        if "since" in running:
            running["since"] = running["since"] - RECENCY_CAP_DAYS
        return (
            self.carrier.stored(carried)
            | {"hidden": hidden}
            | {name: split_float64(value) for name, value in running.items()}
        )

    # ------------------------------------------------------------ export
    def random_feeds(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        """Random valid ``input_names`` -> arrays: a random event after the states of random
        histories of 1 to ``max_len`` events (the first row's ``max_len`` long)."""
        sizes = self.model.contract_sizes()
        history = random_inputs(rng, sizes, batch_size, self.max_len)
        with torch.no_grad():
            states = self.states_after({k: torch.from_numpy(v) for k, v in history.items()})
        event = random_inputs(rng, sizes, batch_size, 1)
        feeds = {spec.name: event[spec.name][:, 0] for spec in self.event_inputs}
        feeds[DAYS_SINCE_INPUT] = event[DAYS_SINCE_INPUT]
        return feeds | {STATE_INPUT.format(name): states[name].numpy() for name in self.field_names}

    def feeds_as_tensors(self, feeds: Mapping[str, np.ndarray]) -> tuple[Tensor, ...]:
        """``input_names`` -> arrays as ``forward``'s positional tensors."""
        return tuple(torch.from_numpy(np.asarray(feeds[name])) for name in self.input_names)

    def dynamic_shapes(self) -> dict[str, tuple[dict[int, object], ...]]:
        """Every input's axis 0 is the dynamic batch."""
        batch = torch.export.Dim(BATCH_AXIS, min=1)
        return {"tensors": tuple({0: batch} for _ in self.input_names)}

    def to_onnx(self, path: str | Path) -> onnx.ModelProto:
        """Export with ``torch.onnx.export(dynamo=True)`` to one file (no external data)."""
        self.eval()
        program = export_program(
            self, self.feeds_as_tensors(self.random_feeds(np.random.default_rng(0), EXPORT_BATCH))
        )
        model = program.model_proto
        self._check_graph(model)
        program.save(str(path), external_data=False)
        return model

    def _signature(self) -> tuple[list[tuple], list[tuple]]:
        """Expected (name, dtype, shape) of the graph's inputs and outputs."""
        sizes = self.model.contract_sizes()

        def shape(axes: tuple[str, ...]) -> tuple[int | str, ...]:
            return tuple(
                BATCH_AXIS if a == BATCH_AXIS else sizes[a] for a in axes if a != SEQUENCE_AXIS
            )

        states = [(spec.dtype.name, (BATCH_AXIS, *spec.shape)) for spec in self.layout.fields]
        events = [(s.dtype, shape(s.axes)) for s in self.event_inputs]
        inputs = [*events, ("float32", (BATCH_AXIS,)), *states]
        distribution = [("float32", (BATCH_AXIS, *self.distribution_shapes()[name]))
                        for name in DISTRIBUTION_OUTPUTS]
        outputs = [(s.dtype, shape(s.axes)) for s in MODEL_OUTPUTS] + distribution + states
        return (
            [(name, *rest) for name, rest in zip(self.input_names, inputs, strict=True)],
            [(name, *rest) for name, rest in zip(self.output_names, outputs, strict=True)],
        )

    def _check_graph(self, model: onnx.ModelProto) -> None:
        """The graph's inputs and outputs are ours, the batch axis symbolic."""
        expected_inputs, expected_outputs = self._signature()
        for kind, values, expected in (
            ("inputs", model.graph.input, expected_inputs),
            ("outputs", model.graph.output, expected_outputs),
        ):
            got = [graph_signature(value) for value in values]
            if got != expected:
                raise RuntimeError(
                    f"step graph {kind} {got} differ from the expected {expected}; the batch "
                    "axis must stay dynamic"
                )


def step_model(twin: TrainedTwin) -> StepModel:
    """The step model of a trained twin, its window the ``max_len`` it was trained with."""
    return StepModel(twin.model.cpu().eval(), twin.spec.max_len).eval()


def check_step_parity(step: StepModel, onnx_path: str | Path, seed: int = 0,
                      batches: tuple[int, ...] = PARITY_BATCHES) -> ParityReport:
    """Compare onnxruntime (CPU) with PyTorch on random events after random states."""
    session = ort_session(Path(onnx_path))
    rng = np.random.default_rng(seed)
    report = ParityReport(shapes=[(batch, 1) for batch in batches])
    for batch in batches:
        feeds = step.random_feeds(rng, batch)
        with torch.no_grad():
            expected = step(*step.feeds_as_tensors(feeds))
        got = session.run(step.output_names, feeds)
        for name, want, have in zip(step.output_names, expected, got, strict=True):
            diff = np.abs(have.astype(np.float64) - want.numpy())
            scaled = diff / np.maximum(1.0, np.abs(want.numpy()))
            report.max_abs[name] = max(report.max_abs.get(name, 0.0), float(diff.max()))
            report.max_scaled[name] = max(report.max_scaled.get(name, 0.0), float(scaled.max()))
    return report


def export_step_model(twin: TrainedTwin, path: str | Path, tolerance: float = PARITY_TOLERANCE,
                      seed: int = 0) -> ParityReport:
    """Write the twin's step graph to ``path`` (one ONNX file, dynamic batch axis) after
    checking it against PyTorch; ``ExportParityError`` (and no file) when they differ by more
    than ``tolerance`` (scaled as ``ParityReport.max_scaled``)."""
    step = step_model(twin)
    with atomic_path(path) as candidate:
        with warnings.catch_warnings(), quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
            warnings.simplefilter("ignore")
            step.to_onnx(candidate)
        report = check_step_parity(step, candidate, seed=seed)
        if report.worst > tolerance:
            bad = {k: v for k, v in report.max_scaled.items() if v > tolerance}
            raise ExportParityError(f"step graph parity check failed (tolerance {tolerance}): {bad}")
    log.info("step graph parity: worst difference %.2e", report.worst)
    return report


def bootstrap_states(twin: TrainedTwin, sequences: SequenceSet,
                     batch_size: int = BOOTSTRAP_BATCH) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The states of every customer of ``sequences`` after its history, ``batch_size``
    customers per batched pass: yields (indexes into ``sequences``, states by field name).

    ``sequences`` holds at most the twin's ``max_len`` last events per customer (as
    ``build_sequences`` keeps them), so each state is the one the full-history model reads.
    """
    step = step_model(twin)
    longest = int(sequences.lengths.max(initial=0))
    if longest > step.max_len:
        raise ValueError(
            f"a history of {longest} events is longer than the twin's max_len {step.max_len}: "
            "build the sequences with the twin's max_len"
        )
    for start in range(0, len(sequences), batch_size):
        index = np.arange(start, min(start + batch_size, len(sequences)))
        with torch.inference_mode():
            states = step.states_after(sequences.batch(index, with_targets=False))
        yield index, {name: value.numpy() for name, value in states.items()}


def divergence_past_max_len(model: TwinModule, sequences: SequenceSet,
                            max_len: int) -> pd.DataFrame:
    """How far the step model drifts from the full-history model past ``max_len`` events.

    ``sequences`` holds whole histories (built with a ``max_len`` above the longest). For
    every customer with more than ``max_len`` events, the step model is fed all its events
    from the empty state; after each event past the ``max_len``-th, its outputs are compared
    with those of the full-history model on the last ``max_len`` events (what batch scoring
    reads), both right after the event. One row per (customer, events so far) with the
    largest scaled difference ``|step - batch| / max(1, |batch|)`` of each output.
    """
    step = StepModel(model, max_len).eval()
    index = np.flatnonzero(sequences.lengths > max_len)
    columns = ["customer_id", "events", *OUTPUT_NAMES]
    if len(index) == 0:
        return pd.DataFrame(columns=columns)
    batch = sequences.batch(index, with_targets=False)
    lengths = batch["length"]
    state = {name: torch.from_numpy(value) for name, value in step.initial_state(len(index)).items()}
    frames = []
    with torch.inference_mode():
        for t in range(int(lengths.max())):
            event = {spec.name: batch[spec.name][:, t] for spec in step.event_inputs}
            outputs, state = step.step(event, torch.zeros(len(index)), state)
            live = lengths > t
            if t < max_len or not live.any():
                continue
            window = {spec.name: batch[spec.name][live, t + 1 - max_len : t + 1]
                      for spec in step.event_inputs}
            rows = int(live.sum())
            window |= {"length": torch.full((rows,), max_len),
                       DAYS_SINCE_INPUT: torch.zeros(rows)}
            expected = model.predict_last(window)
            diffs = {name: _scaled_difference(outputs[name][live], expected[name])
                     for name in OUTPUT_NAMES}
            frames.append(pd.DataFrame(
                {"customer_id": sequences.customer_ids[index[live.numpy()]], "events": t + 1}
                | diffs
            ))
    return pd.concat(frames, ignore_index=True)[columns]


def _scaled_difference(got: Tensor, want: Tensor) -> np.ndarray:
    """Largest ``|got - want| / max(1, |want|)`` of each row."""
    scaled = (got - want).abs() / want.abs().clamp(min=1.0)
    return scaled.reshape(len(scaled), -1).max(dim=1).values.numpy()
