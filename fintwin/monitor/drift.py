"""Population stability index (PSI) of a twin's inputs and outputs against reference
distributions, shared by the served models (sliding windows) and ``fintwin monitor``
(time windows).

A ``Reference`` holds one ``Binning`` per watched quantity: the bins (deciles of the reference
values for numbers, one bin per category for ids) and the reference share of each bin. PSI of
a window is ``sum((a - e) * ln(a / e))`` over the bins, with ``e`` the reference shares and
``a`` the window's, both floored at ``SHARE_FLOOR`` so that an empty bin counts as rare rather
than infinite. Identical distributions give 0; the usual reading is below 0.1 stable, 0.1 to
0.25 worth watching, above 0.25 worth acting on (``Thresholds``, configurable).

Watched quantities (``drift_values``), all per event, as the live model sees each event:

- ``event_type`` (ids of the model's vocabulary), ``amount``, ``gap_days`` (days since the
  customer's previous event; a customer's first event has none), ``day_of_week``,
  ``day_of_month``, ``hour`` (only when the reference timestamps carry times of day);
- ``history_length``: the customer's events so far, this one included;
- ``activity_90d``: the customer's events in the 90 days up to this one (needs the customer's
  past event times: computed offline, not by the live model, whose twins keep no event list);
- outputs right after the event: ``churn_prob`` and ``horizon_spend``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fintwin.data.features import NS_PER_DAY, customer_groups
from fintwin.errors import FintwinInputError

REFERENCE_KEY = "drift_reference"  # fintwin.json: the reference distributions (Reference.to_json)
SHARE_FLOOR = 1e-4
NUMERIC_BINS = 10
ACTIVITY_DAYS = 90
CATEGORICAL, NUMERIC = "categorical", "numeric"
FEATURISED = ("event_type", "amount", "day_of_week", "day_of_month", "hour")  # as featurised
OUTPUTS = ("churn_prob", "horizon_spend")
CATEGORY_COUNTS = {"day_of_week": 7, "hour": 24}


@dataclass(frozen=True)
class Thresholds:
    """PSI levels: ``watch`` (default 0.1) and ``act`` (0.25)."""

    watch: float = 0.1
    act: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.watch <= self.act:
            raise FintwinInputError(
                f"drift thresholds watch={self.watch}, act={self.act}: expected 0 < watch <= act"
            )

    def level(self, psi: float) -> str:
        """``stable``, ``watch`` or ``act`` (``no data`` for NaN)."""
        if not np.isfinite(psi):
            return "no data"
        return "act" if psi >= self.act else "watch" if psi >= self.watch else "stable"


@dataclass(frozen=True)
class Binning:
    """Bins of one quantity and their reference shares.

    Numeric: ``edges`` are the inner bin edges (bin i holds edges[i-1] <= x < edges[i]).
    Categorical: one bin per id 0 .. len(shares) - 1; ids outside go to the last bin.
    """

    kind: str
    edges: tuple[float, ...]
    shares: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.shares)

    def bins(self, values: np.ndarray) -> np.ndarray:
        """Bin index of each (non-NaN) value."""
        if self.kind == NUMERIC:
            return np.searchsorted(np.asarray(self.edges), values, side="right")
        return np.clip(np.asarray(values, dtype=np.int64), 0, self.size - 1)

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Values per bin (NaN values are left out)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        values = values[~np.isnan(values)]
        return np.bincount(self.bins(values), minlength=self.size).astype(np.int64)

    def labels(self) -> list[str]:
        """A short label per bin, for plots."""
        if self.kind == CATEGORICAL:
            return [str(i) for i in range(self.size)]
        bounds = ["-inf", *(f"{e:.3g}" for e in self.edges), "inf"]
        return [f"[{lo}, {hi})" for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def to_json(self) -> dict:
        return {"kind": self.kind, "edges": list(self.edges), "shares": list(self.shares)}

    @classmethod
    def from_json(cls, data: Mapping) -> Binning:
        return cls(data["kind"], tuple(float(e) for e in data["edges"]),
                   tuple(float(s) for s in data["shares"]))

    @classmethod
    def fit(cls, values: np.ndarray, kind: str, categories: int | None = None,
            bins: int = NUMERIC_BINS) -> Binning:
        """Reference bins of ``values`` (NaN left out): deciles for numbers (repeated edges
        merged, so a point mass is one bin), ``categories`` bins for ids."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        values = values[~np.isnan(values)]
        if not len(values):
            raise ValueError("no reference values")
        if kind == NUMERIC:
            quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
            edges = tuple(float(e) for e in np.unique(quantiles))
        else:
            edges = ()
        binning = cls(kind, edges, (0.0,) * (len(edges) + 1 if kind == NUMERIC else categories))
        counts = binning.counts(values)
        return cls(kind, edges, tuple(float(c) for c in counts / counts.sum()))


def psi(shares: np.ndarray | tuple[float, ...], counts: np.ndarray) -> float:
    """PSI of a window's bin ``counts`` against reference ``shares`` (NaN for an empty window)."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    expected = np.maximum(np.asarray(shares, dtype=np.float64), SHARE_FLOOR)
    actual = np.maximum(counts / total, SHARE_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass
class Reference:
    """Reference distributions of a model version (``fintwin.json`` ``drift_reference``)."""

    binnings: dict[str, Binning]
    period: dict[str, str] = field(default_factory=dict)  # first, last: the reference events
    events: int = 0
    customers: int = 0

    def psi(self, counts: Mapping[str, np.ndarray]) -> dict[str, float]:
        """PSI per quantity of bin counts."""
        return {name: psi(self.binnings[name].shares, counts[name]) for name in counts}

    def counts(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bin counts of the watched quantities present in ``values``."""
        return {name: binning.counts(values[name])
                for name, binning in self.binnings.items() if name in values}

    def to_json(self) -> dict:
        return {"binnings": {name: b.to_json() for name, b in self.binnings.items()},
                "period": self.period, "events": self.events, "customers": self.customers}

    @classmethod
    def from_json(cls, data: Mapping, source: str = REFERENCE_KEY) -> Reference:
        try:
            return cls({name: Binning.from_json(b) for name, b in data["binnings"].items()},
                       dict(data.get("period", {})), int(data.get("events", 0)),
                       int(data.get("customers", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise FintwinInputError(f"{source}: not a drift reference ({exc!r})") from None

    @classmethod
    def fit(cls, values: Mapping[str, np.ndarray], categories: Mapping[str, int],
            period: dict[str, str] | None = None, customers: int = 0) -> Reference:
        """Reference of every quantity in ``values`` that has values: categorical when it is
        in ``categories`` (its number of ids), numeric otherwise. ``hour`` is left out when
        every reference hour is 0 (dates without times)."""
        binnings = {}
        for name, array in values.items():
            array = np.asarray(array, dtype=np.float64)
            if np.isnan(array).all() or (name == "hour" and not array.any()):
                continue
            kind = CATEGORICAL if name in categories else NUMERIC
            binnings[name] = Binning.fit(array, kind, categories.get(name))
        first = next(iter(values.values()))
        return cls(binnings, period or {}, len(first), customers)


def categories(vocab_size: int) -> dict[str, int]:
    """Number of ids of each categorical quantity of a model with ``vocab_size`` event types."""
    return {"event_type": vocab_size, **CATEGORY_COUNTS}


def drift_values(customer_ids: np.ndarray, timestamps_ns: np.ndarray,
                 features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Watched input quantities of a whole history table, sorted by customer then time:
    ``features`` are the featuriser's per-event features (``FeaturiserSpec.event_features``)."""
    starts, counts = customer_groups(customer_ids)
    position = np.arange(len(customer_ids)) - np.repeat(starts, counts)
    gap = np.asarray(features["delta_t"], dtype=np.float64).copy()
    gap[position == 0] = np.nan
    return {
        **{name: features[name] for name in FEATURISED},
        "gap_days": gap,
        "history_length": position + 1,
        "activity_90d": _recent_events(timestamps_ns, starts, counts),
    }


def _recent_events(ns: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per event: the customer's events in the ``ACTIVITY_DAYS`` days up to it (inclusive)."""
    if not len(ns):
        return np.zeros(0, np.int64)
    days = (ns - ns.min()) / NS_PER_DAY
    customer = np.repeat(np.arange(len(starts)), counts)
    key = customer * (2.0 * (days.max() + ACTIVITY_DAYS + 1)) + days  # ascending, customers apart
    earliest = np.searchsorted(key, key - ACTIVITY_DAYS, side="left")
    return np.arange(len(ns)) - earliest + 1


def windowed_psi(reference: Reference, values: Mapping[str, np.ndarray],
                 timestamps: np.ndarray, freq: str) -> pd.DataFrame:
    """PSI per quantity (columns) per calendar window of ``freq`` (a pandas period alias such
    as ``M`` or ``W``; rows: each window's start), plus each window's ``events``."""
    periods = pd.PeriodIndex(pd.DatetimeIndex(timestamps), freq=freq)
    rows = []
    for period in periods.unique().sort_values():
        mask = np.asarray(periods == period)
        window = {name: np.asarray(array)[mask] for name, array in values.items()}
        rows.append({"window": period.start_time, "events": int(mask.sum()),
                     **reference.psi(reference.counts(window))})
    return pd.DataFrame(rows).set_index("window")


class SlidingWindow:
    """Histograms of the last ``events`` events (``slots`` sub-windows, the oldest dropped as a
    new one starts), against ``reference``: what a served model keeps per instance."""

    def __init__(self, reference: Reference, events: int = 10_000, slots: int = 10,
                 thresholds: Thresholds | None = None) -> None:
        if events < slots or slots < 1:
            raise FintwinInputError(
                f"drift window of {events} events in {slots} slots: expected events >= slots >= 1"
            )
        self.reference = reference
        self.thresholds = thresholds or Thresholds()
        self.slot_events = events // slots
        self.names = list(reference.binnings)
        self.counts = {name: np.zeros((slots, b.size), np.int64)
                       for name, b in reference.binnings.items()}
        self.filled = np.zeros(slots, np.int64)  # events added to each slot
        self.slot = 0

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        """Count a batch of events (every quantity of the reference present in ``values``)."""
        for name, counts in self.reference.counts(values).items():
            self.counts[name][self.slot] += counts
        self.filled[self.slot] += len(next(iter(values.values()))) if values else 0
        if self.filled[self.slot] >= self.slot_events:
            self.slot = (self.slot + 1) % len(self.filled)
            self.filled[self.slot] = 0
            for counts in self.counts.values():
                counts[self.slot] = 0

    @property
    def events(self) -> int:
        """Events in the window."""
        return int(self.filled.sum())

    def psi(self) -> dict[str, float]:
        """PSI per quantity over the window (NaN for quantities without values yet)."""
        return self.reference.psi({name: c.sum(axis=0) for name, c in self.counts.items()})

    def drifted(self, psi: Mapping[str, float] | None = None) -> dict[str, int]:
        """Quantities at or above each threshold: ``{"watch": n, "act": m}``."""
        values = np.array(list((psi or self.psi()).values()), dtype=np.float64)
        values = values[np.isfinite(values)]
        return {"watch": int((values >= self.thresholds.watch).sum()),
                "act": int((values >= self.thresholds.act).sum())}
