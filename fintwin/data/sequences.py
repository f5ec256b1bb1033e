"""Vectorised per-customer sequences with targets, and the time-based split.

An event table sorted by customer then time is held as flat per-event arrays plus
per-customer offsets (CSR layout); padded batches are gathered with one fancy index. No
Python loop runs over customers.

The split is by time: ``cutoff`` is the last calibration day (inclusive), so observation of
the calibration period ends at midnight after it. Inputs, targets and scaling statistics
only ever see events before that instant; the holdout period is for forecast evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import optimize, stats

from fintwin.data.features import (
    CHUNK_EVENTS,
    MIN_GAP_DAYS,
    NS_PER_DAY,
    EncodedEvents,
    at_rows,
    in_chunks,
)
from fintwin.errors import FintwinInputError

if TYPE_CHECKING:
    from fintwin.data.features import FeaturiserSpec

TARGETS = (
    "next_type",
    "next_gap",
    "next_amount",
    "gap_censored",
    "churn_label",
    "churn_mask",
    "horizon_mask",
)


def observation_end(cutoff: str | pd.Timestamp) -> pd.Timestamp:
    """Instant at which the calibration period ending on day ``cutoff`` (inclusive) ends."""
    return pd.Timestamp(cutoff).normalize() + pd.Timedelta(days=1)


def calibration_events(events: pd.DataFrame, cutoff: str | pd.Timestamp) -> pd.DataFrame:
    """Events strictly before the end of the calibration period (no copy when that is all)."""
    before = events["timestamp"].to_numpy() < observation_end(cutoff).to_datetime64()
    return events if before.all() else events[before]


def _next_event_targets(
    encoded: EncodedEvents,
    rows: slice | np.ndarray,
    is_last: np.ndarray,
    end_days: float,
    horizon_days: float,
) -> dict[str, np.ndarray]:
    """Per-event targets about what follows each of ``rows`` (``is_last``: the customer's
    last calibration event, whose next gap is censored at ``end_days``)."""
    ns = at_rows(encoded.ns, rows)
    times = ns / NS_PER_DAY
    elapsed = end_days - times
    gap = ((at_rows(encoded.ns, rows, 1) - ns) / NS_PER_DAY).astype(np.float32)
    next_gap = np.where(is_last, elapsed, gap).astype(np.float32)
    next_amount = at_rows(encoded.amount, rows, 1).astype(np.float32)
    return {
        "next_type": np.where(is_last, 0, at_rows(encoded.event_type, rows, 1)).astype(np.int64),
        "next_gap": next_gap,
        "next_amount": np.where(is_last, 0.0, next_amount).astype(np.float32),
        "gap_censored": is_last,
        "churn_label": next_gap > horizon_days,
        "churn_mask": ~is_last | (elapsed >= horizon_days),
        "horizon_mask": times + horizon_days <= end_days,
    }


BATCH_DTYPES = {
    name: np.dtype(np.int64)
    for name in ("event_type", "day_of_week", "day_of_month", "hour", "categorical", "next_type")
} | {"churn_label": np.dtype(np.float32)}
"""The dtypes batches hand out (the model contract's) where a ``SequenceSet`` keeps a narrower
one: ids and calendar fields in the smallest integer type that holds them, churn labels as
bool. The values are the same."""


def _batch_dtype(name: str, values: np.ndarray) -> np.ndarray:
    return values.astype(BATCH_DTYPES.get(name, values.dtype), copy=False)


@dataclass
class SequenceSet:
    """Per-customer event sequences in CSR layout, with features and targets per event
    (ids, calendar fields and churn labels in narrow dtypes: ``BATCH_DTYPES``)."""

    customer_ids: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    features: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    last_event_time: np.ndarray
    observation_end: pd.Timestamp

    def __len__(self) -> int:
        return len(self.customer_ids)

    def days_since_last_event(self, at: pd.Timestamp | None = None) -> np.ndarray:
        """Days (float64) from each customer's last event to ``at`` (default: the end of
        observation)."""
        at = self.observation_end if at is None else pd.Timestamp(at)
        last = self.last_event_time.astype("datetime64[ns]").astype(np.int64)
        return (at.value - last) / NS_PER_DAY

    @property
    def n_events(self) -> int:
        """Number of events held (after truncation)."""
        return int(self.lengths.sum())

    def batch(self, index: np.ndarray, with_targets: bool = True) -> dict[str, torch.Tensor]:
        """Right-padded batch for customers ``index`` (shapes in the model contract)."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 0
        positions = np.arange(width)
        valid = positions[None, :] < lengths[:, None]
        gather = np.where(valid, self.starts[index, None] + positions[None, :], 0)
        arrays = dict(self.features, **self.targets) if with_targets else self.features
        out = {}
        for name, flat in arrays.items():
            values = flat[gather]
            mask = valid if values.ndim == 2 else valid[..., None]
            padded = np.where(mask, values, np.zeros((), dtype=flat.dtype))
            out[name] = torch.from_numpy(_batch_dtype(name, padded))
        out["length"] = torch.from_numpy(lengths)
        return out

    def at(self, rows: np.ndarray, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The features or targets ``names`` of the flat events ``rows``, in batch dtypes."""
        arrays = self.features | self.targets
        return {name: _batch_dtype(name, arrays[name][rows]) for name in names}


def loss_terms_per_customer(sequences: SequenceSet, index: np.ndarray) -> dict[str, float]:
    """Mean number of loss terms per customer of ``index``: the model's loss normalisers.

    A loss summed over a batch and divided by (batch size x this mean) weighs every event
    the same whichever batch it falls in; a per-batch mean would give the events of a batch
    of short sequences (which length bucketing creates) far more weight than the rest.
    """
    chosen = np.zeros(len(sequences), dtype=bool)
    chosen[np.asarray(index, dtype=np.int64)] = True
    rows = np.repeat(chosen, sequences.lengths)
    t = {name: values[rows] for name, values in sequences.targets.items()}
    counts = {
        "events_per_customer": (~t["gap_censored"] & (t["next_type"] > 0)).sum(),
        "time_terms_per_customer": rows.sum(),
        "churn_terms_per_customer": t["churn_mask"].sum(),
        "horizon_terms_per_customer": t["horizon_mask"].sum(),
    }
    return {name: float(count) / max(int(chosen.sum()), 1) for name, count in counts.items()}


def training_extent(
    sequences: SequenceSet, index: np.ndarray, horizon_days: float
) -> dict[str, float]:
    """The range the model is trained on, from the customers ``index``, for clamping inputs.

    ``history_max_events`` and ``history_max_days``: the longest kept history (days summed
    over the kept events' ``delta_t``, as ``HistorySummary`` counts them), so the encoder
    clamps the running count and age of longer simulated futures. ``horizon_max_elapsed``:
    the longest silence after which a whole ``horizon_days`` window is observed (see
    ``fintwin.models.module.silent_window_targets``), so the horizon head clamps the silence
    it forecasts after. Without customers (or windows) there is no range: the key is absent.
    """
    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0:
        return {}
    delta = sequences.features["delta_t"].astype(np.float64)
    days = np.add.reduceat(delta, sequences.starts)
    extent = {
        "history_max_events": float(sequences.lengths[index].max()),
        "history_max_days": float(days[index].max()),
    }
    first = np.zeros(len(delta), dtype=bool)
    first[sequences.starts] = True
    times = np.cumsum(np.where(first, 0.0, delta))
    times -= np.repeat(times[sequences.starts], sequences.lengths)
    last = sequences.starts + sequences.lengths - 1
    next_gap = sequences.targets["next_gap"].astype(np.float64)
    end = np.repeat(times[last] + next_gap[last], sequences.lengths)
    room = np.minimum(next_gap, end - times - horizon_days)
    chosen = np.zeros(len(sequences), dtype=bool)
    chosen[index] = True
    rows = np.repeat(chosen, sequences.lengths) & sequences.targets["horizon_mask"]
    if rows.any():
        extent["horizon_max_elapsed"] = float(room[rows].max())
    return extent


MAX_FIT_GAPS = 200_000  # per kind; a seeded subsample beyond this keeps the fit fast


def training_gaps(
    sequences: SequenceSet, index: np.ndarray, max_gaps: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Observed next gaps and censored elapsed times (days) of the customers ``index``.

    With ``max_gaps``, each kind is a seeded random subsample of at most that many.
    """
    chosen = np.zeros(len(sequences), dtype=bool)
    chosen[np.asarray(index, dtype=np.int64)] = True
    rows = np.repeat(chosen, sequences.lengths)
    gaps = np.maximum(sequences.targets["next_gap"][rows].astype(np.float64), MIN_GAP_DAYS)
    censored = sequences.targets["gap_censored"][rows]
    kinds = gaps[~censored], gaps[censored]
    if max_gaps is None:
        return kinds
    rng = np.random.default_rng(seed)
    return tuple(
        rng.choice(values, max_gaps, replace=False) if len(values) > max_gaps else values
        for values in kinds
    )


def fit_population_gaps(observed: np.ndarray, censored: np.ndarray) -> tuple[float, float, float]:
    """Maximum-likelihood log-normal gap with a never-return probability: (mu, sigma, p_dormant)."""
    log_obs, log_cen = np.log(observed), np.log(censored)

    def nll(theta: np.ndarray) -> float:
        mu, log_sigma, logit = theta
        p = 1 / (1 + np.exp(-logit))
        sigma = np.exp(log_sigma)
        dens = stats.norm.logpdf(log_obs, mu, sigma) - log_obs + np.log1p(-p)
        surv = np.log(p + (1 - p) * stats.norm.sf(log_cen, mu, sigma))
        return -(dens.sum() + surv.sum())

    start = np.array([log_obs.mean() if len(log_obs) else 0.0, 0.0, -1.0])
    theta = optimize.minimize(nll, start, method="Nelder-Mead", options={"maxiter": 2000}).x
    return float(theta[0]), float(np.exp(theta[1])), float(1 / (1 + np.exp(-theta[2])))


def _check_time_order(encoded: EncodedEvents) -> None:
    """``FintwinInputError`` naming the first row earlier than the one before it of the same
    customer (a table not sorted by customer then time)."""
    for lo in range(1, len(encoded), CHUNK_EVENTS):
        hi = min(lo + CHUNK_EVENTS, len(encoded))
        back = (encoded.ns[lo:hi] < encoded.ns[lo - 1 : hi - 1]) & ~encoded.first[lo:hi]
        if back.any():
            raise FintwinInputError(
                f"events: row {lo + int(np.flatnonzero(back)[0])} is earlier than the row "
                "before it of the same customer; expected events sorted by customer then time "
                "(fintwin.data.schema.validate_events sorts them)"
            )


def _calibration_runs(encoded: EncodedEvents, end_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """First row and number of calibration events (before ``end_ns``) of every customer with
    any: they lead the customer's run in a table sorted by customer then time."""
    _check_time_order(encoded)
    starts = np.flatnonzero(encoded.first)
    calibrated = encoded.ns < end_ns
    if calibrated.all():
        return starts, np.diff(starts, append=len(encoded))
    starts = starts[calibrated[starts]]
    last = calibrated.copy()
    last[:-1] &= encoded.first[1:] | ~calibrated[1:]
    return starts, np.flatnonzero(last) - starts + 1


def _source_rows(
    kept_starts: np.ndarray, lengths: np.ndarray, shift: np.ndarray, lo: int, hi: int
) -> tuple[slice | np.ndarray, np.ndarray]:
    """Table rows of the sequence events ``lo:hi`` (a slice when one ``shift`` maps them all)
    and whether each is its customer's last."""
    is_last = np.zeros(hi - lo, dtype=bool)
    if hi == lo:
        return slice(lo, hi), is_last
    first = np.searchsorted(kept_starts, lo, "right") - 1
    stop = np.searchsorted(kept_starts, hi, "left")
    ends = kept_starts[first:stop] + lengths[first:stop] - lo
    is_last[ends[ends <= hi - lo] - 1] = True
    moves = shift[first:stop]
    if moves[0] == moves[-1]:  # shift never decreases, so all are equal
        return slice(lo + int(moves[0]), hi + int(moves[0])), is_last
    within = np.diff(np.clip(kept_starts[first:stop], lo, hi), append=hi)
    return np.arange(lo, hi) + np.repeat(moves, within), is_last


def _stored_dtypes(spec: FeaturiserSpec) -> dict[str, np.dtype]:
    """The narrow dtypes a ``SequenceSet`` keeps ids and calendar fields in."""
    categorical = np.result_type(
        np.int8, *(vocab.compact_dtype for vocab in spec.categorical_vocabs)
    )
    small = np.dtype(np.int8)
    return {
        "event_type": spec.vocab.compact_dtype,
        "next_type": spec.vocab.compact_dtype,
        "day_of_week": small,
        "day_of_month": small,
        "hour": small,
        "categorical": categorical,
    }


def build_sequences(
    events: pd.DataFrame, spec: FeaturiserSpec, *, cutoff: str | pd.Timestamp
) -> SequenceSet:
    """Sequences of calibration events (before the end of day ``cutoff``) with targets,
    featurised by ``spec`` (its horizon sets the churn and horizon targets).

    ``events`` must be validated (sorted by customer then time). Each customer keeps its most
    recent ``spec.max_len`` events; targets are computed on the full calibration history
    first, so truncation never changes a target. Customers with a single event are kept.
    The table is read once through compact ids (``FeaturiserSpec.encode``) and featurised
    ``CHUNK_EVENTS`` events at a time straight into the result's arrays.
    """
    end = observation_end(cutoff)
    encoded = spec.encode(events)
    starts, counts = _calibration_runs(encoded, end.value)
    lengths = np.minimum(counts, spec.max_len)
    kept_starts = np.cumsum(lengths) - lengths
    shift = starts + counts - lengths - kept_starts  # table row - sequence event, per customer
    end_days = np.int64(end.value) / NS_PER_DAY

    stored = _stored_dtypes(spec)

    def chunk(lo: int, hi: int) -> dict[str, np.ndarray]:
        rows, is_last = _source_rows(kept_starts, lengths, shift, lo, hi)
        targets = _next_event_targets(encoded, rows, is_last, end_days, spec.horizon_days)
        arrays = encoded.features(rows) | targets
        return {k: v.astype(stored.get(k, v.dtype), copy=False) for k, v in arrays.items()}

    arrays = in_chunks(int(lengths.sum()), chunk)
    return SequenceSet(
        customer_ids=events["customer_id"].iloc[starts].to_numpy().astype(str),
        starts=kept_starts,
        lengths=lengths,
        features={k: v for k, v in arrays.items() if k not in TARGETS},
        targets={k: arrays[k] for k in TARGETS},
        last_event_time=encoded.ns[starts + counts - 1].view("datetime64[ns]"),
        observation_end=end,
    )


def inference_sequences(
    events: pd.DataFrame, spec: FeaturiserSpec, as_of: str | pd.Timestamp | None = None
) -> SequenceSet:
    """Sequences of every event in ``events``, as a deployed twin scores them, observed to the
    end of the day ``as_of`` (default: the last event's day). ``FintwinInputError`` if an event
    comes after it: scoring as of a day must not drop history silently."""
    day = events["timestamp"].max() if as_of is None else pd.Timestamp(as_of)
    late = events["timestamp"] >= observation_end(day)
    if late.any():
        first = events[late].iloc[0]
        raise FintwinInputError(
            f"customer {first['customer_id']} has an event at {first['timestamp']}, after the "
            f"as-of day {day.date()}; score as of a later day or leave out the later events"
        )
    return build_sequences(events, spec, cutoff=day)
