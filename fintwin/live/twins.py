"""Live twins of one model version: its step graph, run with onnxruntime, and its customers'
states in a state store.

``LiveTwins.apply(events)`` steps a batch of validated events (``fintwin.live.events``) from
the customers' stored states and stores the new states, answering every event with a status,
the customer's sequence number and the twin's predictions right after the event (silence 0):

- Events of one customer are stepped in timestamp order, a customer's several events of one
  batch in rounds (one graph run per round, batched over customers), and written with the
  consumer's stream position in ONE ``StateStore.apply`` transaction.
- ``out-of-order``: an event older than the customer's last applied event is refused and
  changes nothing (the twin cannot take back later events); the rest of the batch applies.
- ``duplicate``: an event whose cursor position the consumer has stored already was applied
  before (a replayed stream); it changes nothing.
- Compare-and-set: when another writer (a model instance, another server) advanced one of the
  customers between the read and the write, the store refuses that customer's updates; its
  events are stepped again from the fresh state, up to ``MAX_ATTEMPTS`` times, and answered
  ``conflict`` (nothing applied, send again) only when every attempt lost.

The stored record of a customer is the step graph's state, the predictions after its last
event (``prediction:<output>`` fields, the predictive distribution's parameters among them)
and the alerts' state (``fintwin.live.alerts``), so a twin's current predictions are read back
without running anything (``summary``). Every applied event is answered with its alerts
(``churn_risk``, ``unusual_event``), computed from the record before it and stored with the
new state in one transaction. ``bootstrap`` computes the states of every customer of a
history file in batched rounds and writes them with their event counts as sequence numbers.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd

from fintwin.data.features import NS_PER_DAY, FeaturiserSpec, customer_groups, stored_spec
from fintwin.errors import FintwinInputError
from fintwin.live.alerts import (
    ALERT_STATE,
    CHURN_STATE,
    PARTS,
    AlertConfig,
    EventAlerts,
    event_alerts,
)
from fintwin.live.events import EventBatch, position_key
from fintwin.live.store import (
    StateBatch,
    StateLayout,
    StateStore,
    StreamPosition,
    TwinState,
    iso_time,
)
from fintwin.serving.python_model import load_onnx

log = logging.getLogger(__name__)

LIVE_SUFFIX = "_live"  # the live model of batch model NAME is NAME_live
METADATA_NAME = "fintwin.json"
STEP_GRAPH = "step.onnx"
STEP_KEY = "step"  # the live model's fintwin.json: the step graph's names and the stored layout
PREDICTION_FIELD = "prediction:{}"
APPLIED, DUPLICATE, OUT_OF_ORDER, CONFLICT = "applied", "duplicate", "out-of-order", "conflict"
MAX_ATTEMPTS = 32
RETRY_PAUSE_S = 0.002  # at most, times the attempt: spreads writers that keep colliding
BOOTSTRAP_CUSTOMERS = 2048  # customers per batched round (and per store transaction)


def live_model_name(name: str) -> str:
    """The live model of the batch model ``name`` (``name`` itself when it is one already)."""
    return name if name.endswith(LIVE_SUFFIX) else name + LIVE_SUFFIX


@dataclass(frozen=True)
class StepGraph:
    """The step graph's input and output names (the live model's fintwin.json ``step``)."""

    event_inputs: tuple[str, ...]
    silence_input: str
    state: dict[str, tuple[str, str]]  # field -> (graph input, graph output)
    outputs: tuple[str, ...]
    distribution: tuple[str, ...]  # stored like outputs, not answered

    @classmethod
    def from_metadata(cls, step: Mapping) -> StepGraph:
        return cls(
            tuple(step["event_inputs"]),
            step["silence_input"],
            {name: tuple(names) for name, names in step["state"].items()},
            tuple(step["outputs"]),
            tuple(step.get("distribution", ())),
        )


class StepSession:
    """A live model version's step graph run with onnxruntime, with its stored layout."""

    def __init__(self, graph: StepGraph, layout: StateLayout,
                 session: onnxruntime.InferenceSession) -> None:
        self.graph, self.layout, self.session = graph, layout, session
        self.shapes = {spec.name: spec.shape for spec in layout.fields}

    def run(self, features: Mapping[str, np.ndarray],
            states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step of a batch: event ``features`` (the graph's event inputs, ``delta_t``
        included) after ``states`` (stored fields) -> the new stored fields."""
        graph = self.graph
        feeds = {name: features[name] for name in graph.event_inputs}
        feeds[graph.silence_input] = np.zeros(len(feeds[graph.event_inputs[0]]), np.float32)
        feeds |= {inputs: states[name] for name, (inputs, _) in graph.state.items()}
        predicted = graph.outputs + graph.distribution
        names = list(predicted) + [output for _, output in graph.state.values()]
        values = dict(zip(names, self.session.run(names, feeds), strict=True))
        new = {name: values[output] for name, (_, output) in graph.state.items()}
        for name in predicted:
            field = PREDICTION_FIELD.format(name)
            new[field] = values[name].reshape(len(values[name]), *self.shapes[field])
        return new


@dataclass
class Answers:
    """One answer per event of a batch, in the batch's order."""

    status: np.ndarray  # str: "applied" or "<kind>: <why>"
    seq: np.ndarray  # int64: the customer's events applied, after this one when applied
    outputs: dict[str, np.ndarray]  # prediction fields' shapes; NaN where there is none
    cursor: str  # the consumer's stored position after the batch ('' without a consumer)
    gap_days: np.ndarray  # float64: days since the customer's previous event (NaN: none, or
    # not applied)
    alerts: list[list[dict]]  # the alerts each event raised (none when not applied)
    tails: np.ndarray  # [n, 3] the event's tail probabilities (alerts.PARTS); NaN: none


@dataclass
class Loaded:
    """States of some customers (sorted ids) as arrays, with their sequence and last time."""

    customer_ids: np.ndarray
    arrays: dict[str, np.ndarray]
    seq: np.ndarray
    last_ns: np.ndarray


class LiveTwins:
    """The live twins of one version of a live model (its version directory) in ``store``.

    ``model`` and ``version`` key the states (the live model's Triton name and version); the
    store's layout for them is declared from the version's metadata. ``alerts``: the alert
    thresholds (the live model's config parameters; defaults when None).
    """

    def __init__(self, version_dir: Path, store: StateStore, model: str, version: int,
                 threads: int = 1, alerts: AlertConfig | None = None) -> None:
        version_dir = Path(version_dir)
        metadata = json.loads((version_dir / METADATA_NAME).read_text())
        source = str(version_dir / METADATA_NAME)
        if STEP_KEY not in metadata:
            raise FintwinInputError(f"{source} describes no step graph: not a live model version")
        self.spec: FeaturiserSpec = stored_spec(metadata, source)
        self.quantiles = list(metadata.get("quantiles", []))
        self.stepper = StepSession(StepGraph.from_metadata(metadata[STEP_KEY]),
                                   StateLayout.from_json(metadata[STEP_KEY]["layout"]),
                                   load_onnx(version_dir / STEP_GRAPH, threads))
        self.graph, self.layout, self.shapes = (self.stepper.graph, self.stepper.layout,
                                                self.stepper.shapes)
        needed = [*ALERT_STATE, *(PREDICTION_FIELD.format(n) for n in self.graph.distribution)]
        if not self.graph.distribution or any(name not in self.shapes for name in needed):
            raise FintwinInputError(
                f"{source}: a live model exported without the alerts' fields (predictive "
                "distribution, alert state); export the model again (fintwin export)"
            )
        self.alerts = alerts or AlertConfig()
        self.labels = self.spec.vocab.labels()
        self.store, self.model, self.version = store, model, int(version)
        store.declare(model, self.version, self.layout)

    # ------------------------------------------------------------------ live events
    def apply(self, events: EventBatch) -> Answers:
        """Step and store ``events`` (one consumer's, or none's); see the module docstring."""
        n = len(events)
        answers = Answers(
            status=np.full(n, "", dtype=object),
            seq=np.zeros(n, dtype=np.int64),
            outputs={name: np.full((n, *self.shapes[PREDICTION_FIELD.format(name)]), np.nan,
                                   dtype=np.float32) for name in self.graph.outputs},
            cursor="",
            gap_days=np.full(n, np.nan),
            alerts=[[] for _ in range(n)],
            tails=np.full((n, len(PARTS)), np.nan),
        )
        loaded = self.load(np.unique(events.customer_ids))
        todo, position = self._replayed(events, answers, loaded)
        for attempt in range(MAX_ATTEMPTS):
            if not len(todo):
                break
            if attempt:
                time.sleep(random.uniform(0, RETRY_PAUSE_S * attempt))
                loaded = self.load(np.unique(events.customer_ids[todo]))
            todo = self._attempt(events, todo, loaded, position, answers)
        for event in todo:
            answers.status[event] = (
                f"{CONFLICT}: customer {events.customer_ids[event]!r} was updated by other "
                f"writers during each of {MAX_ATTEMPTS} attempts; nothing applied, send it again"
            )
            answers.seq[event] = -1
        return answers

    def _replayed(self, events: EventBatch, answers: Answers,
                  loaded: Loaded) -> tuple[np.ndarray, StreamPosition | None]:
        """Answer the events the consumer has applied already (``duplicate``); return the
        others and the position to store with them."""
        everything = np.arange(len(events))
        if events.consumer is None:
            return everything, None
        stored = self.store.cursor(self.model, self.version, events.consumer)
        given = np.flatnonzero(events.positions != "")
        keys = [position_key(events.positions[i]) for i in given]
        last = given[max(range(len(keys)), key=keys.__getitem__)] if len(given) else None
        if stored is None:
            answers.cursor = ""
            replayed = np.zeros(0, dtype=np.int64)
        else:
            answers.cursor = stored
            replayed = given[[key <= position_key(stored) for key in keys]]
        for event in replayed:
            self._answer_unchanged(event, events, loaded, answers, (
                f"{DUPLICATE}: consumer {events.consumer!r} has applied its stream up to "
                f"position {stored}, this event is at {events.positions[event]}; nothing changed"
            ))
        if last is None or last in set(replayed.tolist()):
            return np.setdiff1d(everything, replayed), None
        return np.setdiff1d(everything, replayed), StreamPosition(events.consumer,
                                                                   events.positions[last])

    def _attempt(self, events: EventBatch, todo: np.ndarray, loaded: Loaded,
                 position: StreamPosition | None, answers: Answers) -> np.ndarray:
        """Step ``todo`` from ``loaded`` and store the result; return the events of the
        customers another writer changed meanwhile (to step again)."""
        customer = np.searchsorted(loaded.customer_ids, events.customer_ids[todo])
        older = events.timestamps_ns[todo] < np.where(
            loaded.seq[customer] > 0, loaded.last_ns[customer], np.iinfo(np.int64).min
        )
        for event, index in zip(todo[older], customer[older], strict=True):
            self._answer_unchanged(event, events, loaded, answers, (
                f"{OUT_OF_ORDER}: customer {events.customer_ids[event]!r}: event at "
                f"{iso_time(int(events.timestamps_ns[event]))} is older than its last applied "
                f"event at {iso_time(int(loaded.last_ns[index]))}; refused, the twin is unchanged"
            ))
        stepped, updates = self._step(events, todo[~older], customer[~older], loaded)
        result = self.store.apply(self.model, self.version, updates, position)
        if position is not None:
            answers.cursor = position.position
        lost = {events.customer_ids[stepped.event[r.index]] for r in result.rejected}
        for row, event in enumerate(stepped.event):
            if events.customer_ids[event] in lost:
                continue
            answers.status[event] = APPLIED
            answers.seq[event] = stepped.seq[row]
            answers.gap_days[event] = stepped.gap_days[row]
            answers.alerts[event] = stepped.alerts[row]
            answers.tails[event] = stepped.tails[row]
            for name in self.graph.outputs:
                answers.outputs[name][event] = stepped.arrays[PREDICTION_FIELD.format(name)][row]
        return np.array([e for e in todo if events.customer_ids[e] in lost], dtype=np.int64)

    def _answer_unchanged(self, event: int, events: EventBatch, loaded: Loaded,
                          answers: Answers, status: str) -> None:
        """A refused event's answer: the twin's current sequence number and predictions."""
        index = int(np.searchsorted(loaded.customer_ids, events.customer_ids[event]))
        answers.status[event] = status
        answers.seq[event] = loaded.seq[index]
        if loaded.seq[index] > 0:
            for name in self.graph.outputs:
                answers.outputs[name][event] = loaded.arrays[PREDICTION_FIELD.format(name)][index]

    # ------------------------------------------------------------------ stepping
    def _step(self, events: EventBatch, todo: np.ndarray, customer: np.ndarray,
              loaded: Loaded) -> tuple[Stepped, StateBatch]:
        """Step the events ``todo`` (sorted by customer, then time; ``customer``: their index
        in ``loaded``) in rounds, one event per customer each; ``loaded`` is advanced in place.
        The updates come round by round, so each customer's are in sequence order."""
        starts, counts = customer_groups(customer)
        rank = np.arange(len(todo)) - np.repeat(starts, counts)
        stepped = Stepped.empty(self.layout, len(todo))
        first = 0
        for round_ in range(int(rank.max(initial=-1)) + 1):
            rows = np.flatnonzero(rank == round_)
            index, event = customer[rows], todo[rows]
            timestamps = events.timestamps_ns[event]
            delta = np.where(loaded.seq[index] > 0,
                             (timestamps - loaded.last_ns[index]) / NS_PER_DAY, 0.0)
            features = {name: events.features[name][event] for name in self.graph.event_inputs}
            features["delta_t"] = delta.astype(np.float32)
            before = {name: value[index] for name, value in loaded.arrays.items()}
            new = self.run(features, before)
            raised = event_alerts(
                self.alerts, before, loaded.seq[index], new,
                {"event_type": features["event_type"], "amount": features["amount"],
                 "gap_days": delta, "timestamp_ns": timestamps},
                self.labels, self.spec.horizon_days,
            )
            new[CHURN_STATE] = raised.churn_state
            for name, value in new.items():
                loaded.arrays[name][index] = value
            loaded.seq[index] += 1
            loaded.last_ns[index] = timestamps
            stepped.record(first, event, loaded.seq[index], new, raised)
            stepped.gap_days[first:first + len(event)] = np.where(loaded.seq[index] > 1, delta,
                                                                  np.nan)
            first += len(event)
        updates = StateBatch([str(c) for c in events.customer_ids[stepped.event]], stepped.seq,
                             events.timestamps_ns[stepped.event], stepped.arrays,
                             [tuple((a["kind"], json.dumps(a)) for a in raised)
                              for raised in stepped.alerts])
        return stepped, updates

    def run(self, features: Mapping[str, np.ndarray],
            states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step of a batch (``StepSession.run``)."""
        return self.stepper.run(features, states)

    # ------------------------------------------------------------------ stored states
    def load(self, customer_ids: np.ndarray) -> Loaded:
        """The stored states of ``customer_ids`` (sorted, unique); zeros for new customers."""
        rows = self.store.get_rows(self.model, self.version, [str(c) for c in customer_ids])
        return Loaded(np.asarray(customer_ids, dtype=object), rows.arrays, rows.seq,
                      rows.timestamp_ns)

    def summary(self, customer_id: str) -> dict:
        """A customer's twin: events applied, last event time and the predictions right after
        it; ``UnknownCustomerError`` when the store holds no state for it."""
        state = self.store.get(self.model, self.version, [customer_id]).require(customer_id)
        return self.describe(customer_id, state)

    def describe(self, customer_id: str, state: TwinState) -> dict:
        """A stored state as plain JSON values (``summary``)."""
        predictions = {
            name: state.arrays[PREDICTION_FIELD.format(name)] for name in self.graph.outputs
        }
        return {
            "customer_id": customer_id,
            "model": self.model,
            "version": self.version,
            "seq": state.seq,
            "last_event_time": iso_time(state.timestamp_ns),
            "predictions": named_predictions(predictions, self.spec, self.quantiles),
        }

    # ------------------------------------------------------------------ bootstrap
    def bootstrap(self, source: str | Path | pd.DataFrame,
                  chunk: int = BOOTSTRAP_CUSTOMERS) -> BootstrapReport:
        """States of every customer of a history (a source name, path or table), read and
        featurised as the batch model reads it (its last ``max_len`` events), stepped in
        batched rounds and stored with the customer's event count as sequence number.
        Customers the store holds a state for already are left as they are."""
        events = self.spec.read_events(source if isinstance(source, pd.DataFrame) else str(source))
        sequences = self.spec.inference_sequences(events)
        _, counts = customer_groups(events["customer_id"].to_numpy())
        last_ns = sequences.last_event_time.astype("datetime64[ns]").view(np.int64)
        report = BootstrapReport(customers=0, events=0, kept=0)
        for start in range(0, len(sequences), chunk):
            index = np.arange(start, min(start + chunk, len(sequences)))
            updates = StateBatch([str(c) for c in sequences.customer_ids[index]], counts[index],
                                 last_ns[index], self._history_states(sequences, index))
            result = self.store.apply(self.model, self.version, updates)
            applied = index[list(result.applied)]
            report.customers += len(applied)
            report.events += int(counts[applied].sum())
            report.kept += len(result.rejected)
        return report

    def _history_states(self, sequences, index: np.ndarray) -> dict[str, np.ndarray]:
        """Stored fields after each history of ``index``, stepping every position of all of
        them as one batch (rows whose history has ended keep their state)."""
        lengths = sequences.lengths[index]
        arrays = {spec.name: np.zeros((len(index), *spec.shape), spec.dtype)
                  for spec in self.layout.fields}
        for t in range(int(lengths.max(initial=0))):
            live = np.flatnonzero(lengths > t)
            rows = sequences.starts[index[live]] + t
            features = sequences.at(rows, (*self.graph.event_inputs, "delta_t"))
            new = self.run(features, {name: value[live] for name, value in arrays.items()})
            for name, value in new.items():
                arrays[name][live] = value
        return arrays


def named_predictions(outputs: Mapping[str, np.ndarray], spec: FeaturiserSpec,
                      quantiles: list[float]) -> dict:
    """One customer's outputs as JSON values: the next event type's probabilities by type
    name (padding left out), the time quantiles by level, the other outputs as numbers."""
    named = {}
    for name, value in outputs.items():
        flat = np.asarray(value, dtype=np.float64).reshape(-1).tolist()
        if name == "next_event_probs":
            named[name] = dict(zip(spec.vocab.labels()[1:].tolist(), flat[1:], strict=True))
        elif name == "next_time_quantiles":
            named[name] = {f"{level:g}": v for level, v in zip(quantiles, flat, strict=True)}
        else:
            named[name] = flat[0]
    return named


def open_live_twins(repo: Path, name: str, store: StateStore, version: int | None = None,
                    threads: int = 1) -> LiveTwins:
    """The live twins of live model ``name`` (its latest version, or ``version``) of an
    exported repository, in ``store``."""
    from fintwin.export.triton_repo import ModelRepositoryError, model_versions

    model_dir = Path(repo) / name
    versions = model_versions(model_dir)
    if not versions:
        raise ModelRepositoryError(
            f"no version of live model {name!r} in {repo}; export the model with "
            "`fintwin export` (without --no-live)"
        )
    version = versions[-1] if version is None else version
    if version not in versions:
        raise ModelRepositoryError(f"live model {name!r} has versions {versions}, not {version}")
    return LiveTwins(model_dir / str(version), store, name, version, threads,
                     AlertConfig.of_model(model_dir))


@dataclass
class BootstrapReport:
    """What ``LiveTwins.bootstrap`` stored: customers and their events; ``kept``: customers
    with a state already, left unchanged."""

    customers: int
    events: int
    kept: int


@dataclass
class Stepped:
    """The events stepped by one attempt, in the order of their updates, with their new
    stored fields (state and predictions)."""

    event: np.ndarray
    seq: np.ndarray
    arrays: dict[str, np.ndarray]
    gap_days: np.ndarray  # days since the customer's previous event (NaN: its first)
    alerts: list[list[dict]]
    tails: np.ndarray

    @classmethod
    def empty(cls, layout: StateLayout, n: int) -> Stepped:
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64),
                   {spec.name: np.zeros((n, *spec.shape), spec.dtype) for spec in layout.fields},
                   np.full(n, np.nan), [[] for _ in range(n)], np.full((n, len(PARTS)), np.nan))

    def record(self, first: int, events: np.ndarray, seq: np.ndarray,
               new: Mapping[str, np.ndarray], raised: EventAlerts) -> None:
        """One round's events, results and alerts, from position ``first`` on."""
        rows = slice(first, first + len(events))
        self.event[rows], self.seq[rows] = events, seq
        self.alerts[rows], self.tails[rows] = raised.alerts, raised.tails
        for name, value in new.items():
            self.arrays[name][rows] = value
