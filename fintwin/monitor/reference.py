"""The watched values of an event history (``fintwin.monitor.drift``), and the reference
distributions ``fintwin export`` stores from the calibration data.

Outputs after each event come from the step graph (``LiveTwins.run``), the graph the live
model runs, stepped over every customer's whole history in batched rounds (round r steps every
customer's r-th event), so the reference and the served values are computed alike.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from fintwin.data.features import FeaturiserSpec, customer_groups
from fintwin.errors import FintwinInputError
from fintwin.live.store import open_store
from fintwin.live.twins import PREDICTION_FIELD, LiveTwins
from fintwin.monitor.drift import OUTPUTS, Reference, categories, drift_values

log = logging.getLogger(__name__)

REFERENCE_CUSTOMERS = 5000  # customers sampled for a reference (all when fewer)
REFERENCE_MODEL = "reference"


def history_values(events: pd.DataFrame, spec: FeaturiserSpec,
                   twins: LiveTwins | None = None) -> dict[str, np.ndarray]:
    """Watched values of every event of a validated table (sorted by customer, then time):
    inputs, and with ``twins`` the outputs right after each event."""
    ns = events["timestamp"].to_numpy("datetime64[ns]").view(np.int64)
    ids = events["customer_id"].to_numpy()
    features = spec.event_features(events)
    values = drift_values(ids, ns, features)
    if twins is not None:
        values |= outputs_after_each_event(twins, ids, features)
    return values


def outputs_after_each_event(twins: LiveTwins, customer_ids: np.ndarray,
                             features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``OUTPUTS`` right after each event, stepping every history from an empty twin."""
    starts, counts = customer_groups(customer_ids)
    states = {spec.name: np.zeros((len(starts), *spec.shape), spec.dtype)
              for spec in twins.layout.fields}
    outputs = {name: np.zeros(len(customer_ids), np.float64) for name in OUTPUTS}
    for round_ in range(int(counts.max(initial=0))):
        customers = np.flatnonzero(counts > round_)
        rows = starts[customers] + round_
        step_features = {name: features[name][rows] for name in (*twins.graph.event_inputs,
                                                                   "delta_t")}
        new = twins.run(step_features, {name: value[customers] for name, value in states.items()})
        for name, value in new.items():
            states[name][customers] = value
        for name in OUTPUTS:
            outputs[name][rows] = new[PREDICTION_FIELD.format(name)].reshape(len(rows))
    return outputs


def sample_customers(events: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    """The events of at most ``limit`` customers drawn at random (all when fewer)."""
    ids = events["customer_id"].unique()
    if len(ids) <= limit:
        return events
    keep = np.random.default_rng(seed).choice(ids, size=limit, replace=False)
    return events[events["customer_id"].isin(keep)]


def reference_of(events: pd.DataFrame, spec: FeaturiserSpec, twins: LiveTwins | None = None,
                 limit: int = REFERENCE_CUSTOMERS) -> Reference:
    """Reference distributions of a history table (at most ``limit`` customers)."""
    sample = sample_customers(events, limit)
    values = history_values(sample, spec, twins)
    period = {"first": str(sample["timestamp"].min()), "last": str(sample["timestamp"].max())}
    return Reference.fit(values, categories(spec.vocab.size), period,
                         customers=int(sample["customer_id"].nunique()))


def open_scratch_twins(version_dir: Path, scratch: Path) -> LiveTwins:
    """Live twins of a step graph version directory, their states in a scratch SQLite file
    (nothing is kept: only ``LiveTwins.run`` is used)."""
    store = open_store(f"sqlite:///{Path(scratch) / 'reference-states.db'}")
    return LiveTwins(version_dir, store, REFERENCE_MODEL, 1)


def calibration_reference(twin, source: str | None, live_dir: Path | None) -> dict | None:
    """The reference (JSON) of a trained twin's calibration events: those of ``source``
    (default: the data it was trained on) up to its cut-off; outputs from the step graph in
    ``live_dir`` (a version directory) when given.

    A ``source`` given and unreadable raises FintwinInputError; the training data unreadable
    (e.g. exported on another machine) logs a warning and returns None.
    """
    from fintwin.data.sequences import calibration_events
    from fintwin.twin.pipeline import read_events

    given = source is not None
    source = source if given else twin.split.get("source")
    try:
        if not isinstance(source, str):
            raise FintwinInputError(f"the checkpoint names no readable data source ({source!r})")
        events = calibration_events(read_events(twin, source), twin.split["cutoff"])
    except (FintwinInputError, OSError) as exc:
        if given:
            raise FintwinInputError(f"--reference-data {source}: {exc}") from exc
        log.warning("no drift reference stored: the training data cannot be read (%s); "
                    "give it with --reference-data", exc)
        return None
    if events.empty:
        raise FintwinInputError(f"{source}: no events on or before the cut-off "
                                f"{twin.split['cutoff']} to take a drift reference from")
    with tempfile.TemporaryDirectory(prefix="fintwin-reference-") as scratch:
        twins = open_scratch_twins(live_dir, Path(scratch)) if live_dir is not None else None
        try:
            return reference_of(events, twin.spec, twins).to_json()
        finally:
            if twins is not None:
                twins.store.close()
