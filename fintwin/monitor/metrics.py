"""fintwin's own Prometheus metrics, next to Triton's ``nv_inference_*``.

``METRICS`` lists every family (name, type, help, labels); the served models publish them
through Triton's python-backend custom metrics API (``TritonSink``: Triton's metrics endpoint,
port 8002, serves them with its own) and processes of ours through ``prometheus_client``
(``PrometheusSink``). Names follow Prometheus conventions: counters end in ``_total``, the
unit is in the name (``_seconds``), PSI is a plain number.

``ModelMetrics`` is what a model records into: requests and events by outcome, rejected inputs
by reason, alerts by kind (``alerts``: for the live model's alert rules), the live-state
count, state store latency (``TimedStore``) and the drift gauges of a ``SlidingWindow``.
Each call of the python-backend API is a message to the server, so counts are added once per
batch and the drift gauges refreshed at most every ``DRIFT_REFRESH_S``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fintwin.monitor.drift import SlidingWindow

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
MODEL_LABELS = ("model", "version")
STORE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DRIFT_REFRESH_S = 1.0
LIVE_STATES_REFRESH_S = 60.0


@dataclass(frozen=True)
class MetricSpec:
    """One metric family."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = MODEL_LABELS
    buckets: tuple[float, ...] = ()


REQUESTS = MetricSpec("fintwin_requests_total", COUNTER,
                      "Requests answered by a fintwin model, by outcome (ok, invalid, error)",
                      (*MODEL_LABELS, "outcome"))
EVENTS = MetricSpec("fintwin_events_total", COUNTER,
                    "Events answered by a live model, by outcome (applied, duplicate, "
                    "out-of-order, conflict, invalid)", (*MODEL_LABELS, "outcome"))
CUSTOMERS = MetricSpec("fintwin_customers_scored_total", COUNTER,
                       "Customer histories scored by a batch model")
REJECTED = MetricSpec("fintwin_rejected_inputs_total", COUNTER,
                      "Requests refused as invalid, by reason (the field or check that failed)",
                      (*MODEL_LABELS, "reason"))
ALERTS = MetricSpec("fintwin_alerts_total", COUNTER, "Alerts raised by a live model, by kind",
                    (*MODEL_LABELS, "kind"))
LIVE_STATES = MetricSpec("fintwin_live_states", GAUGE,
                         "Customers with a stored twin state of this model version")
STORE_SECONDS = MetricSpec("fintwin_state_store_seconds", HISTOGRAM,
                           "Latency of state store operations (get, apply, cursor)",
                           (*MODEL_LABELS, "operation"), STORE_BUCKETS_S)
DRIFT_PSI = MetricSpec("fintwin_drift_psi", GAUGE,
                       "Population stability index of a watched input or output over the "
                       "drift window, against the export's reference", (*MODEL_LABELS, "feature"))
DRIFTED = MetricSpec("fintwin_drifted_features", GAUGE,
                     "Watched inputs and outputs whose PSI is at or above a level (watch, act)",
                     (*MODEL_LABELS, "level"))
DRIFT_EVENTS = MetricSpec("fintwin_drift_window_events", GAUGE, "Events in the drift window")
METRICS = (REQUESTS, EVENTS, CUSTOMERS, REJECTED, ALERTS, LIVE_STATES, STORE_SECONDS, DRIFT_PSI,
           DRIFTED, DRIFT_EVENTS)


def exported_names() -> set[str]:
    """Every sample name a scrape can show (a histogram's ``_bucket``, ``_sum``, ``_count``)."""
    names = set()
    for spec in METRICS:
        suffixes = ("_bucket", "_sum", "_count") if spec.kind == HISTOGRAM else ("",)
        names |= {spec.name + suffix for suffix in suffixes}
    return names


class Sink(Protocol):
    """Where metric values go: Triton's custom metrics or a prometheus_client registry."""

    def add(self, spec: MetricSpec, labels: Mapping[str, str], amount: float) -> None: ...

    def set(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None: ...

    def observe(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None: ...


class TritonSink:
    """Metrics through the python backend's ``pb_utils.MetricFamily`` (inside Triton only)."""

    def __init__(self, pb_utils: Any) -> None:
        self.pb_utils = pb_utils
        self.families: dict[str, Any] = {}
        self.metrics: dict[tuple, Any] = {}

    def _metric(self, spec: MetricSpec, labels: Mapping[str, str]) -> Any:
        key = (spec.name, tuple(sorted(labels.items())))
        if key not in self.metrics:
            family_type = self.pb_utils.MetricFamily
            if spec.name not in self.families:
                self.families[spec.name] = family_type(
                    name=spec.name, description=spec.help,
                    kind={COUNTER: family_type.COUNTER, GAUGE: family_type.GAUGE,
                          HISTOGRAM: family_type.HISTOGRAM}[spec.kind])
            options = {"buckets": list(spec.buckets)} if spec.kind == HISTOGRAM else {}
            self.metrics[key] = self.families[spec.name].Metric(labels=dict(labels), **options)
        return self.metrics[key]

    def add(self, spec: MetricSpec, labels: Mapping[str, str], amount: float) -> None:
        self._metric(spec, labels).increment(float(amount))

    def set(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None:
        self._metric(spec, labels).set(float(value))

    def observe(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None:
        self._metric(spec, labels).observe(float(value))


class PrometheusSink:
    """Metrics in a ``prometheus_client`` registry (its own by default), for processes of
    ours; ``serve(port)`` exposes them over HTTP."""

    def __init__(self, registry: Any = None) -> None:
        import prometheus_client

        self.client = prometheus_client
        self.registry = registry or prometheus_client.CollectorRegistry()
        self.collectors: dict[str, Any] = {}

    def _collector(self, spec: MetricSpec) -> Any:
        if spec.name not in self.collectors:
            kinds = {COUNTER: self.client.Counter, GAUGE: self.client.Gauge,
                     HISTOGRAM: self.client.Histogram}
            options = {"buckets": spec.buckets} if spec.kind == HISTOGRAM else {}
            self.collectors[spec.name] = kinds[spec.kind](
                spec.name, spec.help, spec.labels, registry=self.registry, **options)
        return self.collectors[spec.name]

    def add(self, spec: MetricSpec, labels: Mapping[str, str], amount: float) -> None:
        self._collector(spec).labels(**labels).inc(amount)

    def set(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None:
        self._collector(spec).labels(**labels).set(value)

    def observe(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None:
        self._collector(spec).labels(**labels).observe(value)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve the registry at ``http://host:port/metrics`` from a daemon thread."""
        self.client.start_http_server(port, host, registry=self.registry)


class ModelMetrics:
    """The metrics of one model version, recorded into ``sink``; ``drift``: the version's
    sliding window (None without a reference)."""

    def __init__(self, sink: Sink, model: str, version: int,
                 drift: SlidingWindow | None = None) -> None:
        self.sink, self.drift = sink, drift
        self.labels = {"model": model, "version": str(version)}
        self.drift_shown = 0.0  # monotonic time of the last gauge refresh
        self.live_states_read = -np.inf
        self.states = self.created = 0

    def requests(self, outcomes: Iterable[str]) -> None:
        """Requests answered, one outcome each (``ok``, ``invalid``, ``error``)."""
        self._count(REQUESTS, "outcome", outcomes)

    def events(self, outcomes: Iterable[str]) -> None:
        """Events answered, one outcome each: a status (``applied``, ``duplicate``,
        ``out-of-order: ...``: the kind before the colon is kept), ``invalid`` or ``error``."""
        self._count(EVENTS, "outcome", (outcome.partition(":")[0] for outcome in outcomes))

    def customers(self, count: int) -> None:
        """Customer histories scored by a batch model."""
        if count:
            self.sink.add(CUSTOMERS, self.labels, count)

    def rejected(self, reasons: Iterable[str]) -> None:
        """Invalid requests, one reason each (the field or check that failed)."""
        self._count(REJECTED, "reason", reasons)

    def alerts(self, kinds: Iterable[str]) -> None:
        """Alerts raised, one kind each (e.g. ``churn-risk``): call with the kinds of the
        alerts of a batch."""
        self._count(ALERTS, "kind", kinds)

    def store_latency(self, operation: str, seconds: float) -> None:
        self.sink.observe(STORE_SECONDS, {**self.labels, "operation": operation}, seconds)

    def twins_created(self, count: int) -> None:
        """Customers whose first event this instance applied (counted until the next read)."""
        self.created += count

    def live_states(self, count_states: Callable[[], int], now: float | None = None) -> None:
        """Set the live-state gauge: ``count_states()`` (a read of the store's keys) at most
        every ``LIVE_STATES_REFRESH_S``, in between the last count plus the twins this instance
        created since (exact with one writer; other writers' show at the next read)."""
        now = time.monotonic() if now is None else now
        if now - self.live_states_read >= LIVE_STATES_REFRESH_S:
            self.live_states_read, self.states, self.created = now, count_states(), 0
        self.sink.set(LIVE_STATES, self.labels, self.states + self.created)

    def observe_drift(self, values: Mapping[str, np.ndarray], now: float | None = None) -> None:
        """Add a batch's watched values to the window; refresh the gauges when due."""
        if self.drift is None:
            return
        self.drift.add(values)
        now = time.monotonic() if now is None else now
        if now - self.drift_shown >= DRIFT_REFRESH_S:
            self.drift_shown = now
            self.show_drift()

    def show_drift(self) -> None:
        """Set the drift gauges from the window (a quantity without values yet is left out)."""
        psi = self.drift.psi()
        for name, value in psi.items():
            if np.isfinite(value):
                self.sink.set(DRIFT_PSI, {**self.labels, "feature": name}, value)
        for level, count in self.drift.drifted(psi).items():
            self.sink.set(DRIFTED, {**self.labels, "level": level}, count)
        self.sink.set(DRIFT_EVENTS, self.labels, self.drift.events)

    def _count(self, spec: MetricSpec, label: str, values: Iterable[str]) -> None:
        for value, count in Counter(values).items():
            self.sink.add(spec, {**self.labels, label: value}, count)


class TimedStore:
    """A state store whose ``get``, ``apply`` and ``cursor`` calls are timed into
    ``metrics``; everything else is the wrapped store's."""

    def __init__(self, store: Any, metrics: ModelMetrics) -> None:
        self._store, self._metrics = store, metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _timed(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return getattr(self._store, operation)(*args, **kwargs)
        finally:
            self._metrics.store_latency(operation, time.perf_counter() - started)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("get", *args, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("apply", *args, **kwargs)

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("cursor", *args, **kwargs)
