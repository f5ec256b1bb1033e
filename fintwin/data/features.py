"""The featuriser: one definition of per-event model inputs, used by training and by clients.

``FeaturiserSpec`` holds everything that turns raw events into model inputs: the schema
options the events are validated with, the event-type and categorical vocabularies (ids: 0 =
padding, 1 = out-of-vocabulary, 2.. known values), numeric and categorical fields, the input
scaling, ``max_len``, same-day merging and the horizon. The data module fits it on the
training customers' calibration events and writes it into the checkpoint; the export copies
``to_dict()`` unchanged into the model's metadata; clients, rollouts, reports and the live
path read it back with ``stored_spec``.

Per event: event type id, raw amount, days since the customer's previous event, calendar
features, raw numeric extras, categorical ids. Scaling (log1p + standardise) is fitted on
calibration data only and applied inside the model, so the exported graph takes raw values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fintwin.data.schema import EventSchema, validate_events
from fintwin.data.sources import load_events, merge_same_day
from fintwin.errors import FintwinInputError

if TYPE_CHECKING:
    from fintwin.data.sequences import SequenceSet

PAD_ID = 0
OOV_ID = 1
PAD_LABEL = "<pad>"  # the type name shown for PAD_ID
OOV_LABEL = "<oov>"  # the type name shown for OOV_ID (a type unknown to the vocabulary)
NS_PER_DAY = 86_400 * 10**9
MIN_GAP_DAYS = 1e-3  # shortest gap between events (same-instant ties are clamped to it)


def _is_categorical(values: object) -> bool:
    return isinstance(getattr(values, "dtype", None), pd.CategoricalDtype)


@dataclass(frozen=True)
class Vocab:
    """Vocabulary of event types (or of a categorical field's values): known values get ids
    2.. in sorted order."""

    tokens: tuple[str, ...]

    @classmethod
    def fit(cls, values: pd.Series | np.ndarray) -> Vocab:
        """Vocabulary of the distinct values seen (calibration data of training customers)."""
        return cls(tuple(sorted(pd.unique(np.asarray(values, dtype=object)))))

    @property
    def size(self) -> int:
        """Number of ids including padding and OOV."""
        return len(self.tokens) + 2

    def labels(self) -> np.ndarray:
        """Name of every id, indexable by id: PAD_LABEL, OOV_LABEL, then the known types."""
        return np.array([PAD_LABEL, OOV_LABEL, *self.tokens], dtype=object)

    @property
    def compact_dtype(self) -> np.dtype:
        """The smallest signed integer dtype that holds every id."""
        return np.min_scalar_type(-self.size)

    def _codes(self, values: pd.Index | np.ndarray) -> np.ndarray:
        """Position of each value among the tokens, -1 for unknown values."""
        return pd.Categorical(values, categories=list(self.tokens)).codes

    def encode(self, values: pd.Series | np.ndarray, dtype: np.dtype = np.int64) -> np.ndarray:
        """Vectorised lookup (ids of ``dtype``): unknown values map to OOV_ID. A categorical
        column is recoded through its categories; other values are looked up
        ``CHUNK_EVENTS`` at a time (no temporary the size of the column)."""
        ids = np.arange(OOV_ID, self.size, dtype=dtype)  # ids[code + 1]
        if _is_categorical(values):
            values = getattr(values, "array", values)  # the Categorical itself, not a copy
            by_code = np.append(ids[self._codes(values.categories) + 1], ids[0])  # OOV_ID
            return by_code[values.codes]  # code -1 (missing) takes the last: OOV_ID
        values = np.asarray(values, dtype=object)

        def chunk(lo: int, hi: int) -> dict[str, np.ndarray]:
            return {"id": ids[self._codes(values[lo:hi]) + 1]}

        return in_chunks(len(values), chunk)["id"]

    def to_dict(self) -> dict[str, int]:
        """Mapping value -> id, as stored with checkpoints and exported models."""
        return {t: i + 2 for i, t in enumerate(self.tokens)}

    @classmethod
    def from_dict(cls, mapping: dict[str, int]) -> Vocab:
        """Inverse of to_dict."""
        return cls(tuple(t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])))


def run_starts(customer_ids: pd.Series | np.ndarray) -> np.ndarray:
    """Whether each row begins a customer's run (bool) in a table sorted by customer; a
    categorical column is compared by its integer codes."""
    if _is_categorical(customer_ids):
        customer_ids = getattr(customer_ids, "array", customer_ids).codes
    ids = np.asarray(customer_ids)
    first = np.ones(len(ids), dtype=bool)
    np.not_equal(ids[1:], ids[:-1], out=first[1:])
    return first


def customer_groups(customer_ids: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offset of each customer's run in a table sorted by customer, and run lengths."""
    starts = np.flatnonzero(run_starts(customer_ids))
    counts = np.diff(starts, append=len(customer_ids))
    return starts, counts


def calendar_features(ns: np.ndarray) -> dict[str, np.ndarray]:
    """Day of week (Monday = 0), day of month and hour of int64 nanosecond timestamps."""
    days = ns // NS_PER_DAY  # floored, as numpy casts datetime64[ns] to datetime64[D]
    if len(days):  # one table entry per calendar day the timestamps span
        first = days.min()
        span = np.arange(first, days.max() + 1).astype("datetime64[D]")
        day_of_month = (span - span.astype("datetime64[M]")).astype(np.int64) + 1
        days_in = days - first
    else:
        day_of_month, days_in = np.zeros(0, dtype=np.int64), days
    return {
        "day_of_week": (days + 3) % 7,  # 1970-01-01 was a Thursday
        "day_of_month": day_of_month[days_in],
        "hour": (ns % NS_PER_DAY) // (3600 * 10**9),
    }


def at_rows(values: np.ndarray, rows: slice | np.ndarray, offset: int = 0) -> np.ndarray:
    """``values`` at ``rows`` (a slice or ascending row numbers) + ``offset``, clamped into
    the array; a view when ``rows`` is a slice that stays inside."""
    if isinstance(rows, slice):
        start, stop = rows.start + offset, rows.stop + offset
        if 0 <= start and stop <= len(values):
            return values[start:stop]
        rows = np.arange(rows.start, rows.stop)
    elif offset == 0:
        return values[rows]
    return values[np.clip(rows + offset, 0, len(values) - 1)]


CHUNK_EVENTS = 1 << 17  # events featurised at once: temporaries stay small and in cache


def in_chunks(n: int, part: Callable[[int, int], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays of ``n`` rows filled ``CHUNK_EVENTS`` rows at a time: ``part(lo, hi)`` returns
    rows ``lo:hi`` of each array (every chunk the same names, dtypes and trailing shapes)."""
    out = {}
    for lo in range(0, max(n, 1), CHUNK_EVENTS):
        hi = min(lo + CHUNK_EVENTS, n)
        for name, values in part(lo, hi).items():
            if name not in out:
                out[name] = np.empty((n, *values.shape[1:]), dtype=values.dtype)
            out[name][lo:hi] = values
    return out


@dataclass(frozen=True)
class EncodedEvents:
    """A validated event table as the featuriser reads it: int64 nanosecond times, where each
    customer's run begins, compact vocabulary ids (``Vocab.compact_dtype``), and the amount
    and numeric columns as they are (views of the table, not copies)."""

    ns: np.ndarray
    first: np.ndarray
    event_type: np.ndarray
    amount: np.ndarray
    numeric: tuple[np.ndarray, ...] = ()
    categorical: tuple[np.ndarray, ...] = ()

    def __len__(self) -> int:
        return len(self.ns)

    def features(self, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """The per-event model inputs of ``rows`` (``FeaturiserSpec.event_features``)."""
        ns = at_rows(self.ns, rows)
        delta = (ns - at_rows(self.ns, rows, -1)) / NS_PER_DAY
        delta[at_rows(self.first, rows)] = 0.0
        features = {
            "event_type": at_rows(self.event_type, rows).astype(np.int64),
            "amount": at_rows(self.amount, rows).astype(np.float32),
            "delta_t": delta.astype(np.float32),
            **calendar_features(ns),
        }
        if self.numeric:
            features["numeric"] = np.stack([at_rows(v, rows) for v in self.numeric], 1).astype(
                np.float32
            )
        if self.categorical:
            features["categorical"] = np.stack(
                [at_rows(v, rows) for v in self.categorical], 1
            ).astype(np.int64)
        return features


def read_events(
    source: str | pd.DataFrame,
    schema: EventSchema,
    *,
    same_day_merge: bool,
    simulator_config=None,
) -> pd.DataFrame:
    """A source (name, path or table) validated with ``schema``; with ``same_day_merge``,
    one event per customer, day and type (``fintwin.data.sources.merge_same_day``)."""
    if isinstance(source, pd.DataFrame):
        events, _ = validate_events(source, schema, source="events")
        return merge_same_day(events, schema.numeric_features) if same_day_merge else events
    events, _ = load_events(
        source, schema, same_day_merge=same_day_merge, simulator_config=simulator_config
    )
    return events


REEXPORT_HINT = (
    "export the model again from its checkpoint (fintwin export --ckpt CKPT --repo DIR), or "
    "train it again"
)


def _stats(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(max(x.std(), 1e-6))


@dataclass(frozen=True)
class Scaling:
    """Input scaling statistics of the training customers' calibration events: mean and
    standard deviation of log1p(amount), log1p(delta_t), log of the positive gaps and of each
    raw numeric feature. The model standardises its inputs with them."""

    amount_mean: float
    amount_std: float
    delta_t_mean: float
    delta_t_std: float
    gap_log_mean: float
    gap_log_std: float
    numeric_mean: tuple[float, ...] = ()
    numeric_std: tuple[float, ...] = ()

    @classmethod
    def fit(cls, features: Mapping[str, np.ndarray]) -> Scaling:
        """Statistics of flat per-event ``features`` (``FeaturiserSpec.event_features``)."""
        amount = _stats(np.log1p(np.maximum(features["amount"].astype(np.float64), 0)))
        delta = _stats(np.log1p(features["delta_t"].astype(np.float64)))
        gaps = features["delta_t"][features["delta_t"] > 0].astype(np.float64)
        gap_log = _stats(np.log(gaps)) if len(gaps) else (0.0, 1.0)
        numeric_mean, numeric_std = (), ()
        if "numeric" in features and features["numeric"].shape[1]:
            numeric = features["numeric"].astype(np.float64)
            numeric_mean = tuple(numeric.mean(axis=0).tolist())
            numeric_std = tuple(np.maximum(numeric.std(axis=0), 1e-6).tolist())
        return cls(*amount, *delta, *gap_log, numeric_mean, numeric_std)

    def to_dict(self) -> dict[str, float | list[float]]:
        """JSON-able statistics (the model's ``scaling`` keys)."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, mapping: Mapping[str, object], source: str = "scaling") -> Scaling:
        """Inverse of ``to_dict``; keys that are no statistic of this class (the model's
        training statistics) are ignored, missing ones refused naming ``source``."""
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in mapping]
        if missing:
            raise FintwinInputError(
                f"{source}: scaling statistics lack {missing}; " + REEXPORT_HINT
            )
        values = {}
        for field in fields:
            if field.name in mapping:
                value = mapping[field.name]
                values[field.name] = (
                    tuple(float(v) for v in value) if isinstance(value, (list, tuple))
                    else float(value)
                )
        return cls(**values)


SPEC_FORMAT = 1  # version of FeaturiserSpec.to_dict's layout
FEATURISER_KEY = "featuriser"  # where checkpoints and exported metadata keep the spec's dict
LEGACY_KEYS = (  # the flat data settings stored before FeaturiserSpec, converted by from_dict
    "vocab", "scaling", "max_len", "horizon_days", "same_day_merge", "numeric_features",
    "allow_negative_amount", "drop_duplicates",
)
@dataclass(frozen=True)
class FeaturiserSpec:
    """Everything that turns raw events into model inputs, fitted on training data.

    ``vocab``: event types. ``numeric_features``: raw numeric columns, in model order.
    ``categorical_features`` and ``categorical_vocabs``: categorical columns and one
    vocabulary each, in model order (``features["categorical"]`` column order).
    ``scaling``: input statistics (None until the data module fits them). ``max_len``: events
    kept per customer (the most recent). ``horizon_days``: the horizon of the churn and
    horizon heads. ``same_day_merge``: one event per customer, day and type.
    ``allow_negative_amount``, ``drop_duplicates``, ``day_first``, ``decimal``: how raw
    events are validated (``schema()``).
    """

    vocab: Vocab
    max_len: int
    horizon_days: float
    scaling: Scaling | None = None
    same_day_merge: bool = False
    numeric_features: tuple[str, ...] = ()
    categorical_features: tuple[str, ...] = ()
    categorical_vocabs: tuple[Vocab, ...] = ()
    allow_negative_amount: bool = False
    drop_duplicates: bool = False
    day_first: bool | None = None
    decimal: str | None = None

    def __post_init__(self) -> None:
        if len(self.categorical_vocabs) != len(self.categorical_features):
            raise ValueError(
                f"{len(self.categorical_features)} categorical features but "
                f"{len(self.categorical_vocabs)} vocabularies; expected one each"
            )

    @property
    def n_numeric(self) -> int:
        """Number of numeric features per event."""
        return len(self.numeric_features)

    @property
    def categorical(self) -> tuple[tuple[str, Vocab], ...]:
        """(name, vocabulary) of each categorical feature, in model order."""
        return tuple(zip(self.categorical_features, self.categorical_vocabs, strict=True))

    @property
    def categorical_sizes(self) -> tuple[int, ...]:
        """Vocabulary size of each categorical feature (padding and OOV included)."""
        return tuple(vocab.size for vocab in self.categorical_vocabs)

    def input_sizes(self) -> dict[str, int | list[int]]:
        """The sizes of the model inputs it featurises (``fintwin.data.contract``'s
        ``vocab_size``, ``numeric_features``, ``categorical_features``, ``categorical_sizes``)."""
        return {
            "vocab_size": self.vocab.size,
            "numeric_features": self.n_numeric,
            "categorical_features": len(self.categorical_features),
            "categorical_sizes": list(self.categorical_sizes),
        }

    def schema(self) -> EventSchema:
        """The schema raw events are validated with."""
        return EventSchema(
            numeric_features=list(self.numeric_features),
            categorical_features=list(self.categorical_features),
            allow_negative_amount=self.allow_negative_amount,
            drop_duplicates=self.drop_duplicates,
            day_first=self.day_first,
            decimal=self.decimal,
        )

    def read_events(self, source: str | pd.DataFrame, simulator_config=None) -> pd.DataFrame:
        """The validated (and same-day merged) events of a source name, path or table."""
        return read_events(
            source, self.schema(), same_day_merge=self.same_day_merge,
            simulator_config=simulator_config,
        )

    def encode(self, events: pd.DataFrame, starts: np.ndarray | None = None) -> EncodedEvents:
        """A validated table (sorted by customer then time) as ``EncodedEvents``; ``starts``
        (first row of each customer) is found from ``customer_id`` when not given."""
        if starts is None:
            first = run_starts(events["customer_id"])
        else:
            first = np.zeros(len(events), dtype=bool)
            first[starts] = True
        return EncodedEvents(
            ns=events["timestamp"].to_numpy("datetime64[ns]").view(np.int64),
            first=first,
            event_type=self.vocab.encode(events["event_type"], self.vocab.compact_dtype),
            amount=events["amount"].to_numpy(),
            numeric=tuple(events[name].to_numpy() for name in self.numeric_features),
            categorical=tuple(
                vocab.encode(events[name], vocab.compact_dtype) for name, vocab in self.categorical
            ),
        )

    def event_features(
        self, events: pd.DataFrame, starts: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Flat per-event model inputs of a validated table sorted by customer then time.

        ``event_type`` int64, ``amount`` and ``delta_t`` float32, the calendar features,
        ``numeric`` float32 ``[N, F]`` and ``categorical`` int64 ids ``[N, C]`` when declared.
        ``starts`` (first row of each customer) is computed when not given.
        """
        encoded = self.encode(events, starts)
        return in_chunks(len(encoded), lambda lo, hi: encoded.features(slice(lo, hi)))

    def sequences(self, events: pd.DataFrame, cutoff: str | pd.Timestamp) -> SequenceSet:
        """Calibration histories with targets (events before the end of day ``cutoff``)."""
        from fintwin.data.sequences import build_sequences  # sequences builds on this module

        return build_sequences(events, self, cutoff=cutoff)

    def inference_sequences(
        self, events: pd.DataFrame, as_of: str | pd.Timestamp | None = None
    ) -> SequenceSet:
        """Every customer's history as a deployed twin scores it, observed to the end of the
        day ``as_of`` (default: the last event's day)."""
        from fintwin.data.sequences import inference_sequences

        return inference_sequences(events, self, as_of)

    def to_dict(self) -> dict[str, object]:
        """JSON-able settings with their ``format``; ``from_dict`` reads them back."""
        return {
            "format": SPEC_FORMAT,
            "vocab": self.vocab.to_dict(),
            "max_len": self.max_len,
            "horizon_days": self.horizon_days,
            "scaling": None if self.scaling is None else self.scaling.to_dict(),
            "same_day_merge": self.same_day_merge,
            "numeric_features": list(self.numeric_features),
            "categorical_features": list(self.categorical_features),
            "categorical_vocabs": {
                name: vocab.to_dict()
                for name, vocab in self.categorical
            },
            "allow_negative_amount": self.allow_negative_amount,
            "drop_duplicates": self.drop_duplicates,
            "day_first": self.day_first,
            "decimal": self.decimal,
        }

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "featuriser settings") -> FeaturiserSpec:
        """Inverse of ``to_dict``. Settings without a ``format`` (written before this class)
        go through ``from_legacy``. ``FintwinInputError`` names ``source`` and what is wrong."""
        if "format" not in data:
            return cls.from_legacy(data, source)
        if data["format"] != SPEC_FORMAT:
            raise FintwinInputError(
                f"{source}: featuriser settings of format {data['format']!r}; this fintwin "
                f"reads format {SPEC_FORMAT}: use the fintwin version that wrote them, or "
                + REEXPORT_HINT
            )
        expected = {"format", *(field.name for field in dataclasses.fields(cls))}
        missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
        if missing or unknown:
            raise FintwinInputError(
                f"{source}: featuriser settings lack {missing} and have unknown keys {unknown}; "
                f"expected {sorted(expected)}"
            )
        names = tuple(data["categorical_features"])
        return cls(
            vocab=Vocab.from_dict(data["vocab"]),
            max_len=int(data["max_len"]),
            horizon_days=float(data["horizon_days"]),
            scaling=None if data["scaling"] is None else Scaling.from_dict(data["scaling"], source),
            same_day_merge=bool(data["same_day_merge"]),
            numeric_features=tuple(data["numeric_features"]),
            categorical_features=names,
            categorical_vocabs=tuple(
                Vocab.from_dict(data["categorical_vocabs"][name]) for name in names
            ),
            allow_negative_amount=bool(data["allow_negative_amount"]),
            drop_duplicates=bool(data["drop_duplicates"]),
            day_first=data["day_first"],
            decimal=data["decimal"],
        )

    @classmethod
    def from_legacy(cls, data: Mapping, source: str) -> FeaturiserSpec:
        """The one converter of the flat data settings stored before this class (checkpoints
        hold them all; exported repositories lack the schema options and are refused).

        Their categorical features never reached the model, so the spec declares none.
        """
        missing = [key for key in LEGACY_KEYS if key not in data]
        if missing:
            raise FintwinInputError(
                f"{source}: featuriser settings written before fintwin's FeaturiserSpec lack "
                f"{missing}, so events cannot be read as in training; " + REEXPORT_HINT
            )
        return cls(
            vocab=Vocab.from_dict(data["vocab"]),
            max_len=int(data["max_len"]),
            horizon_days=float(data["horizon_days"]),
            scaling=Scaling.from_dict(data["scaling"], source),
            same_day_merge=bool(data["same_day_merge"]),
            numeric_features=tuple(data["numeric_features"]),
            allow_negative_amount=bool(data["allow_negative_amount"]),
            drop_duplicates=bool(data["drop_duplicates"]),
        )


def stored_spec(document: Mapping, source: str) -> FeaturiserSpec:
    """The spec a checkpoint's data state or an export's metadata keeps under
    ``FEATURISER_KEY``; documents written before ``FeaturiserSpec`` hold the settings flat,
    which ``FeaturiserSpec.from_dict`` converts or refuses."""
    return FeaturiserSpec.from_dict(document.get(FEATURISER_KEY, document), source)
