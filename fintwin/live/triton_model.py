"""The live model in Triton's python backend: raw events in, each customer's twin stepped and
stored, its fresh predictions out (``fintwin.live.repository`` lists the inputs and outputs).

``TritonPythonModel`` is what the version's ``model.py`` imports; ``LiveModel`` holds the rest
and runs in process too. ``execute`` reads the rows of all the requests Triton batched together
as one batch of events (every check looks at one row) and applies them with
``LiveTwins.apply``. When a row is bad, each request is read alone, so that only the requests
holding bad rows are refused, with ``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT) and a
message naming the row and field, and nothing of theirs is applied; the others are answered.
Requests whose rows carry cursors of different consumers are applied one consumer at a time.

The state store is the config parameter ``state_store`` when set, else the environment
variable ``FINTWIN_STATE_STORE``, else the SQLite file ``<repository>-states.db`` next to the
exported model repository (``default_store_url``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fintwin.errors import FintwinInputError
from fintwin.live.alerts import AlertConfig
from fintwin.live.events import EventBatch, event_fields, read_events
from fintwin.live.store import open_store
from fintwin.live.twins import APPLIED, PREDICTION_FIELD, STEP_GRAPH, LiveTwins
from fintwin.monitor.metrics import ModelMetrics, TimedStore
from fintwin.monitor.served import applied_values, record_requests, triton_metrics

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton's python backend (in-process use, tests)
    pb_utils = None

STATE_STORE_PARAMETER = "state_store"
STATE_STORE_ENV = "FINTWIN_STATE_STORE"
INTRA_OP_THREADS_PARAMETER = "intra_op_threads"
STATUS_OUTPUT, SEQ_OUTPUT, CURSOR_OUTPUT = "status", "seq", "stored_cursor"
ALERTS_OUTPUT, TAILS_OUTPUT = "alerts", "event_tail_probs"

Result = dict[str, np.ndarray] | Exception


def default_store_url(repository: Path) -> str:
    """The embedded default store: ``<repository>-states.db`` next to the model repository."""
    repository = Path(repository).resolve()
    return f"sqlite:///{repository.parent / (repository.name + '-states.db')}"


def store_url(configured: str, repository: Path) -> str:
    """The state store's URL: ``configured`` (a model parameter, an option), else
    ``$FINTWIN_STATE_STORE``, else ``default_store_url(repository)``."""
    return configured or os.environ.get(STATE_STORE_ENV) or default_store_url(repository)


class LiveModel:
    """Answers batches of live requests (field name -> one value per row) for ``twins``."""

    def __init__(self, twins: LiveTwins, metrics: ModelMetrics | None = None) -> None:
        self.twins = twins
        self.metrics = metrics
        self.optional = [f.name for f in event_fields(twins.spec) if f.optional]

    def answer(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[Result]:
        """Per request: its outputs (name -> array, one row per event) or its error
        (``FintwinInputError`` for bad events, nothing of that request applied)."""
        columns = [{name: np.asarray(value).reshape(-1) for name, value in request.items()}
                   for request in requests]
        sizes = [_rows(request) for request in columns]
        results: list[Result | None] = [None] * len(requests)
        groups = self._read(columns, sizes, results)
        for members, batch in groups:
            offsets = np.cumsum([0] + [sizes[i] for i in members])
            outputs = self._apply(batch, int(offsets[-1]))
            for member, start, stop in zip(members, offsets[:-1], offsets[1:], strict=True):
                results[member] = {name: value[start:stop] for name, value in outputs.items()}
        if self.metrics is not None:
            record_requests(self.metrics, sizes, results)
        return results

    def _read(self, columns: list[dict[str, np.ndarray]], sizes: list[int],
              results: list[Result | None]) -> list[tuple[list[int], EventBatch]]:
        """The requests read together, else each alone (errors go to ``results``)."""
        combined = self._concatenate(columns, sizes) if len(columns) > 1 else None
        if combined is not None:
            with contextlib.suppress(FintwinInputError):  # a bad row: read each request alone
                return [(list(range(len(columns))), self._events(combined))]
        groups = []
        for index, request in enumerate(columns):
            try:
                groups.append(([index], self._events(request)))
            except FintwinInputError as exc:
                results[index] = exc
        return groups

    def _events(self, columns: Mapping[str, np.ndarray]) -> EventBatch:
        return read_events(columns, self.twins.spec)

    def _concatenate(self, columns: list[dict[str, np.ndarray]],
                     sizes: list[int]) -> dict[str, np.ndarray] | None:
        """One set of columns for several requests (optional fields a request lacks: ''), or
        None when a request lacks a required field (it is read alone, and refused)."""
        names = {name for request in columns for name in request}
        if any(name not in request and name not in self.optional
               for request in columns for name in names):
            return None
        return {
            name: np.concatenate([
                request.get(name, np.full(size, b"", dtype=object))
                for request, size in zip(columns, sizes, strict=True)
            ])
            for name in names
        }

    def _apply(self, batch: EventBatch, rows: int) -> dict[str, np.ndarray]:
        """Apply a batch (one consumer at a time) and lay its answers out by request row."""
        twins = self.twins
        outputs = {name: np.full((rows, *twins.shapes[PREDICTION_FIELD.format(name)]), np.nan, np.float32)
                   for name in twins.graph.outputs}
        outputs[STATUS_OUTPUT] = np.full((rows, 1), b"", dtype=object)
        outputs[SEQ_OUTPUT] = np.zeros((rows, 1), dtype=np.int64)
        outputs[CURSOR_OUTPUT] = np.full((rows, 1), b"", dtype=object)
        outputs[ALERTS_OUTPUT] = np.full((rows, 1), b"[]", dtype=object)
        outputs[TAILS_OUTPUT] = np.full((rows, 3), np.nan, np.float32)
        answers = twins.apply(batch)
        outputs[ALERTS_OUTPUT][batch.rows, 0] = [json.dumps(a).encode() for a in answers.alerts]
        outputs[TAILS_OUTPUT][batch.rows] = answers.tails
        if self.metrics is not None:
            self.metrics.events(answers.status)
            self.metrics.alerts([alert["kind"] for raised in answers.alerts for alert in raised])
            self.metrics.twins_created(int(np.sum((answers.seq == 1) & (answers.status == APPLIED))))
            self.metrics.observe_drift(applied_values(batch.features, answers.status, answers.seq,
                                                      answers.gap_days, answers.outputs))
        for name in twins.graph.outputs:
            outputs[name][batch.rows] = answers.outputs[name]
        outputs[STATUS_OUTPUT][batch.rows, 0] = [s.encode() for s in answers.status]
        outputs[SEQ_OUTPUT][batch.rows, 0] = answers.seq
        outputs[CURSOR_OUTPUT][:, 0] = answers.cursor.encode()
        return outputs


def _rows(request: Mapping[str, np.ndarray]) -> int:
    return max((len(value) for value in request.values()), default=0)


class TritonPythonModel:
    """Triton python-backend entry point: one instance per model instance (stub process)."""

    def initialize(self, args: dict) -> None:
        """Load the version's step graph and metadata and open the state store."""
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        parameters = config.get("parameters", {})
        configured = parameters.get(STATE_STORE_PARAMETER, {}).get("string_value", "")
        threads = int(parameters.get(INTRA_OP_THREADS_PARAMETER, {}).get("string_value") or 1)
        # the exported repository: the embedded server serves a copy whose files are links to it
        repository = (version_dir / STEP_GRAPH).resolve().parent.parent.parent
        url = store_url(configured, repository)
        metrics = triton_metrics(pb_utils, args)
        store = TimedStore(open_store(url), metrics)
        alerts = AlertConfig.from_parameters(parameters, f"live model {config['name']} config")
        self.model = LiveModel(
            LiveTwins(version_dir, store, config["name"], int(args["model_version"]), threads,
                      alerts),
            metrics,
        )
        pb_utils.Logger.log_info(
            f"live model {config['name']} version {args['model_version']}: step graph "
            f"{version_dir / 'step.onnx'}, state store {_redacted(url)}"
        )

    def execute(self, requests: list) -> list:
        """One response per request, in order; a bad request gets a TritonError, never a raise."""
        try:
            inputs = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
            results = self.model.answer(inputs)
        # never let an exception out of execute: Triton would fail every request of the call
        except Exception as exc:
            results = [RuntimeError(f"internal error: {exc}")] * len(requests)
            self.model.metrics.requests(["error"] * len(requests))
        twins = self.model.twins
        self.model.metrics.live_states(lambda: len(twins.store.customer_ids(twins.model,
                                                                            twins.version)))
        return [_response(result) for result in results]

    def finalize(self) -> None:
        self.model.twins.store.close()


def _response(result: Result) -> pb_utils.InferenceResponse:
    if isinstance(result, Exception):
        error = pb_utils.TritonError
        code = error.INVALID_ARG if isinstance(result, FintwinInputError) else error.INTERNAL
        return pb_utils.InferenceResponse(output_tensors=[], error=error(str(result), code))
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value))
                        for name, value in result.items()]
    )


def _redacted(url: str) -> str:
    """A store URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.partition(':')[0] + ':***@' if at else ''}{host}"
