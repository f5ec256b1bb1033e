"""The featuriser: one definition of per-event model inputs, used by training and by clients.

Per event: event type id (0 = padding, 1 = out-of-vocabulary), raw amount, days since the
customer's previous event, calendar features, raw numeric extras. Scaling (log1p +
standardise) is fitted here on calibration data only and applied inside the model, so the
exported graph takes raw values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PAD_ID = 0
OOV_ID = 1
PAD_LABEL = "<pad>"  # the type name shown for PAD_ID
OOV_LABEL = "<oov>"  # the type name shown for OOV_ID (a type unknown to the vocabulary)
NS_PER_DAY = 86_400 * 10**9
MIN_GAP_DAYS = 1e-3  # shortest gap between events (same-instant ties are clamped to it)


@dataclass(frozen=True)
class Vocab:
    """Event-type vocabulary: known types get ids 2.. in sorted order."""

    tokens: tuple[str, ...]

    @classmethod
    def fit(cls, event_types: pd.Series | np.ndarray) -> Vocab:
        """Vocabulary of the distinct event types seen (calibration data of training customers)."""
        return cls(tuple(sorted(pd.unique(np.asarray(event_types, dtype=object)))))

    @property
    def size(self) -> int:
        """Number of ids including padding and OOV."""
        return len(self.tokens) + 2

    def labels(self) -> np.ndarray:
        """Name of every id, indexable by id: PAD_LABEL, OOV_LABEL, then the known types."""
        return np.array([PAD_LABEL, OOV_LABEL, *self.tokens], dtype=object)

    def encode(self, event_types: pd.Series | np.ndarray) -> np.ndarray:
        """Vectorised lookup: unknown types map to OOV_ID."""
        codes = pd.Categorical(
            np.asarray(event_types, dtype=object), categories=list(self.tokens)
        ).codes
        return np.where(codes < 0, OOV_ID, codes.astype(np.int64) + 2)

    def to_dict(self) -> dict[str, int]:
        """Mapping type -> id, as stored with exported models."""
        return {t: i + 2 for i, t in enumerate(self.tokens)}

    @classmethod
    def from_dict(cls, mapping: dict[str, int]) -> Vocab:
        """Inverse of to_dict."""
        return cls(tuple(t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])))


def customer_groups(customer_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offset of each customer's run in a table sorted by customer, and run lengths."""
    ids = np.asarray(customer_ids)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    counts = np.diff(np.concatenate([starts, [len(ids)]])).astype(np.int64)
    return starts, counts


def calendar_features(ns: np.ndarray) -> dict[str, np.ndarray]:
    """Day of week (Monday = 0), day of month and hour of int64 nanosecond timestamps."""
    ts = ns.view("datetime64[ns]")
    days = ts.astype("datetime64[D]")
    return {
        "day_of_week": (days.astype(np.int64) + 3) % 7,  # 1970-01-01 was a Thursday
        "day_of_month": (days - ts.astype("datetime64[M]")).astype(np.int64) + 1,
        "hour": (ns % NS_PER_DAY) // (3600 * 10**9),
    }


def event_features(events: pd.DataFrame, vocab: Vocab, numeric_features: list[str],
                   starts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Flat per-event model inputs for an event table sorted by customer then time.

    ``starts`` (first row of each customer) is computed when not given.
    """
    ns = events["timestamp"].to_numpy("datetime64[ns]").view(np.int64)
    if starts is None:
        starts, _ = customer_groups(events["customer_id"].to_numpy())
    delta = np.zeros(len(ns), dtype=np.float64)
    delta[1:] = np.diff(ns) / NS_PER_DAY
    delta[starts] = 0.0
    features = {
        "event_type": vocab.encode(events["event_type"].to_numpy()),
        "amount": events["amount"].to_numpy(np.float32),
        "delta_t": delta.astype(np.float32),
        **calendar_features(ns),
    }
    if numeric_features:
        features["numeric"] = events[numeric_features].to_numpy(np.float32)
    return features


def fit_scaling(features: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
    """Mean/std of log1p(amount), log1p(delta_t), log of positive gaps, raw numeric extras."""

    def stats(x: np.ndarray) -> tuple[float, float]:
        return float(x.mean()), float(max(x.std(), 1e-6))

    amount_mean, amount_std = stats(np.log1p(np.maximum(features["amount"].astype(np.float64), 0)))
    delta_mean, delta_std = stats(np.log1p(features["delta_t"].astype(np.float64)))
    scaling: dict[str, float | list[float]] = {
        "amount_mean": amount_mean,
        "amount_std": amount_std,
        "delta_t_mean": delta_mean,
        "delta_t_std": delta_std,
        "numeric_mean": [],
        "numeric_std": [],
    }
    gaps = features["delta_t"][features["delta_t"] > 0].astype(np.float64)
    scaling["gap_log_mean"], scaling["gap_log_std"] = stats(np.log(gaps)) if len(gaps) else (0.0, 1.0)
    if "numeric" in features and features["numeric"].shape[1]:
        num = features["numeric"].astype(np.float64)
        scaling["numeric_mean"] = num.mean(axis=0).tolist()
        scaling["numeric_std"] = np.maximum(num.std(axis=0), 1e-6).tolist()
    return scaling
