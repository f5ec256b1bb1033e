"""Metrics and drift of the served models: what their ``TritonPythonModel`` sets up, and the
watched values of the events a live model applied.

Config parameters of a model (``config.pbtxt`` ``parameters``): ``drift_window_events`` (the
sliding window, default 10,000 events per model instance), ``drift_watch`` (0.1) and
``drift_act`` (0.25). Without a reference in the version's ``fintwin.json`` (a model exported
with its training data out of reach) there are no drift gauges.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fintwin.data.schema import EventValidationError
from fintwin.monitor.drift import (
    FEATURISED,
    OUTPUTS,
    REFERENCE_KEY,
    Reference,
    SlidingWindow,
    Thresholds,
)
from fintwin.monitor.metrics import ModelMetrics, TritonSink

WINDOW_PARAMETER, WATCH_PARAMETER, ACT_PARAMETER = "drift_window_events", "drift_watch", "drift_act"
DEFAULT_WINDOW_EVENTS = 10_000
WINDOW_SLOTS = 10


def parameter(config: Mapping, name: str, default: float) -> float:
    """A numeric parameter of a model config in its JSON form (``default`` when unset)."""
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    try:
        return float(value) if value != "" else default
    except ValueError:
        raise ValueError(f"model config parameter {name!r} is {value!r}; expected a number") from None


def drift_window(config: Mapping, metadata: Mapping) -> SlidingWindow | None:
    """The sliding window of a model version with a reference in its ``metadata``."""
    if REFERENCE_KEY not in metadata:
        return None
    thresholds = Thresholds(parameter(config, WATCH_PARAMETER, Thresholds.watch),
                            parameter(config, ACT_PARAMETER, Thresholds.act))
    events = int(parameter(config, WINDOW_PARAMETER, DEFAULT_WINDOW_EVENTS))
    return SlidingWindow(Reference.from_json(metadata[REFERENCE_KEY]), events, WINDOW_SLOTS,
                         thresholds)


def triton_metrics(pb_utils: Any, args: Mapping) -> ModelMetrics:
    """The metrics of the model version Triton's ``initialize(args)`` loads."""
    config = json.loads(args["model_config"])
    version_dir = Path(args["model_repository"]) / args["model_version"]
    metadata_path = version_dir / "fintwin.json"
    metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}
    return ModelMetrics(TritonSink(pb_utils), config["name"], int(args["model_version"]),
                        drift_window(config, metadata))


def applied_values(features: Mapping[str, np.ndarray], status: np.ndarray, seq: np.ndarray,
                   gap_days: np.ndarray, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Watched values of the applied events of a live batch: its per-event ``features``
    (``EventBatch.features``) and the answers (``Answers`` fields, in the batch's order)."""
    applied = status == "applied"
    values = {name: features[name][applied] for name in FEATURISED}
    values["gap_days"] = gap_days[applied]
    values["history_length"] = seq[applied]
    values |= {name: outputs[name][applied].reshape(-1) for name in OUTPUTS if name in outputs}
    return values


def record_requests(metrics: ModelMetrics, sizes: list[int], results: list) -> None:
    """A live batch's requests by outcome (``ok``, ``invalid``), and its invalid requests'
    reasons and events; ``results``: per request its outputs or its error."""
    invalid = [(size, result) for size, result in zip(sizes, results, strict=True)
               if isinstance(result, Exception)]
    metrics.requests("invalid" if isinstance(result, Exception) else "ok" for result in results)
    metrics.rejected(rejection_reason(error) for _, error in invalid)
    metrics.events(["invalid"] * sum(size for size, _ in invalid))


def rejection_reason(error: Exception) -> str:
    """The metrics label of an invalid request: the field that failed, else ``request``."""
    column = error.column if isinstance(error, EventValidationError) else None
    return column or "request"
