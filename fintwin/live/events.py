"""Raw events in: the live model's input fields, read and featurised as training reads events.

A live request holds one event per row: ``customer_id``, ``timestamp``, ``event_type`` (text),
``amount`` (a number), the model's declared numeric (number) and categorical (text) columns by
name, and an optional ``cursor`` (text ``CONSUMER:POSITION``: the consumer's position in its
input stream after this event, stored with the states). A timestamp is ISO-8601 (with an
offset, converted to UTC, or without one: UTC) or epoch seconds as a decimal string
(``1719836400.25``); numeric dates and spreadsheet serials, which event files may hold, are
refused here because a single value cannot say which convention it follows.

Each row is checked and normalised by the event contract's parsers
(``fintwin.data.schema.normalise_events``, ``parse_timestamps``)
and featurised by the model's ``FeaturiserSpec``: a bad row raises ``EventValidationError``
naming the row and field; an unknown event type or categorical value gets the OOV id. Every
check looks at one row at a time, so the rows of several requests are read together and each
is read as it would be alone.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fintwin.data.features import FeaturiserSpec
from fintwin.data.schema import (
    ISO_DATE,
    ISO_OFFSET,
    EventValidationError,
    normalise_events,
    parse_timestamps,
)

TEXT, NUMBER = "text", "number"
REQUIRED_FIELDS = (
    ("customer_id", TEXT),
    ("timestamp", TEXT),
    ("event_type", TEXT),
    ("amount", NUMBER),
)
CURSOR_FIELD = "cursor"
EPOCH_SECONDS = re.compile(r"\s*([+-]?)(\d+)(?:\.(\d*))?\s*")
POSITION = re.compile(r"\d+(?:-\d+)*")  # a line number, or a Redis stream id (ms-seq)
NS_PER_SECOND = 10**9
LIVE_TIMESTAMP_FORMS = (
    "an ISO-8601 timestamp (2024-07-01T12:30:00, 2024-07-01T12:30:00+02:00, 2024-07-01) or "
    "epoch seconds as a decimal string (1719837000.5)"
)


@dataclass(frozen=True)
class EventField:
    """One input of the live model: its name, ``TEXT`` or ``NUMBER``, and whether a request
    may leave it out."""

    name: str
    kind: str
    optional: bool = False


def event_fields(spec: FeaturiserSpec) -> list[EventField]:
    """The live model's inputs for a model featurised by ``spec``, in config order."""
    fields = [EventField(name, kind) for name, kind in REQUIRED_FIELDS]
    fields += [EventField(name, NUMBER) for name in spec.numeric_features]
    fields += [EventField(name, TEXT) for name in spec.categorical_features]
    fields.append(EventField(CURSOR_FIELD, TEXT, optional=True))
    names = [f.name for f in fields]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(
            f"the model's feature columns {clashes} clash with the live model's own inputs "
            f"({', '.join(n for n, _ in REQUIRED_FIELDS)}, {CURSOR_FIELD}); rename them"
        )
    return fields


def position_key(position: str) -> tuple[int, ...]:
    """A stream position as comparable numbers: ``"17"`` -> (17,), ``"1700-3"`` -> (1700, 3)."""
    return tuple(int(part) for part in position.split("-"))


@dataclass
class EventBatch:
    """Validated events sorted by customer, then time (ties keep their request order).

    ``rows``: the index of each event in the request rows it was read from;
    ``features``: the model's per-event inputs (``FeaturiserSpec.event_features``), whose
    ``delta_t`` is computed when the event is stepped, from the customer's stored last event;
    ``consumer`` and ``positions``: the stream cursor of the events that carry one (None and
    empty strings without).
    """

    rows: np.ndarray
    customer_ids: np.ndarray
    timestamps_ns: np.ndarray
    features: dict[str, np.ndarray]
    consumer: str | None = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: np.ndarray) -> EventBatch:
        """The events at ``index`` (which keeps the sort order when ascending)."""
        return EventBatch(
            self.rows[index],
            self.customer_ids[index],
            self.timestamps_ns[index],
            {name: values[index] for name, values in self.features.items()},
            self.consumer,
            self.positions[index],
        )


def read_events(
    columns: Mapping[str, np.ndarray], spec: FeaturiserSpec, source: str = "request"
) -> EventBatch:
    """Validate and featurise raw event ``columns`` (field name -> one value per row).

    Raises ``EventValidationError`` (a ``FintwinInputError``) naming ``source``, the field and
    the first offending rows (0-based) when a field is missing or a value is unusable.
    """
    fields = event_fields(spec)
    rows = _row_count(columns, fields, source)
    index = pd.RangeIndex(rows)
    values = {
        f.name: _column(columns[f.name], f, source, index)
        for f in fields
        if f.name in columns
    }
    values["timestamp"] = live_timestamps(values["timestamp"], source, spec.day_first)
    events = normalise_events(pd.DataFrame(values), spec.schema(), source)
    customer_ids = events["customer_id"].to_numpy(dtype=object)
    timestamps = events["timestamp"].to_numpy("datetime64[ns]").view(np.int64)
    order = np.lexsort((timestamps, customer_ids))  # by customer, then time; ties: row order
    features = spec.event_features(events, starts=np.arange(rows))  # per event (delta_t: 0)
    consumer, positions = _cursors(values.get(CURSOR_FIELD), rows, source)
    return EventBatch(
        rows=order.astype(np.int64),
        customer_ids=customer_ids[order],
        timestamps_ns=timestamps[order],
        features={name: value[order] for name, value in features.items()},
        consumer=consumer,
        positions=positions[order],
    )


def live_timestamps(text: pd.Series, source: str, day_first: bool | None = None) -> pd.Series:
    """Timestamps of one event each: ISO-8601 (rows with and without an offset parsed
    apart, each as the event contract reads it) or epoch seconds; naive UTC datetimes."""
    stripped = [value.strip() for value in text]
    epoch = np.array([EPOCH_SECONDS.fullmatch(value) is not None for value in stripped], bool)
    iso = np.array([ISO_DATE.match(value) is not None for value in stripped], bool) & ~epoch
    bad = ~(epoch | iso)
    if bad.any():
        raise EventValidationError(
            source, "timestamp",
            f"unparseable timestamp {text[bad].iloc[0]!r}; expected {LIVE_TIMESTAMP_FORMS}",
            text.index[bad][:5],
        )
    parsed = np.full(len(text), np.datetime64("NaT"), dtype="datetime64[ns]")
    parsed[epoch] = [_epoch_ns(value) for value, is_epoch in zip(stripped, epoch, strict=True)
                     if is_epoch]
    aware = iso & np.array([ISO_OFFSET.search(value[10:]) is not None for value in stripped], bool)
    for group in (aware, iso & ~aware):
        if group.any():
            values = np.array(stripped, dtype=object)[group]
            fast = None if group is aware else _plain_iso(values)
            parsed[group] = fast if fast is not None else parse_timestamps(
                pd.Series(values, index=text.index[group]), source, day_first=day_first
            ).to_numpy()
    return pd.Series(parsed, index=text.index)


def _plain_iso(values: np.ndarray) -> np.ndarray | None:
    """Naive ISO-8601 timestamps parsed by numpy, a fast path for the common case (None when
    numpy does not read them all: the contract's parser then does, with its messages)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return np.array(values.tolist(), dtype="datetime64[ns]")
    except (ValueError, TypeError, OverflowError, Warning):
        return None


def _epoch_ns(text: str) -> np.datetime64:
    """Epoch seconds (a decimal string) as an exact nanosecond timestamp."""
    sign, whole, fraction = EPOCH_SECONDS.fullmatch(text).groups()
    ns = int(whole) * NS_PER_SECOND + int((fraction or "").ljust(9, "0")[:9])
    return np.datetime64(-ns if sign == "-" else ns, "ns")


def _row_count(columns: Mapping[str, np.ndarray], fields: list[EventField], source: str) -> int:
    missing = [f.name for f in fields if not f.optional and f.name not in columns]
    if missing:
        expected = ", ".join(f"{f.name} ({f.kind}{', optional' if f.optional else ''})" for f in fields)
        raise EventValidationError(
            source, missing[0], f"missing field; every event needs {expected}"
        )
    sizes = {f.name: len(np.asarray(columns[f.name]).reshape(-1)) for f in fields if f.name in columns}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise EventValidationError(
            source, None, f"fields hold different numbers of rows {sizes}; expected one value "
            "per event in every field, at least one event"
        )
    return next(iter(sizes.values()))


def _column(values: np.ndarray, spec: EventField, source: str, index: pd.Index) -> pd.Series:
    """One field as text (str) or numbers (float64), one value per row."""
    flat = np.asarray(values).reshape(-1)
    if spec.kind == NUMBER:
        if flat.dtype.kind not in "fiu":
            raise EventValidationError(
                source, spec.name, f"values of dtype {flat.dtype}; expected numbers (FP32)"
            )
        return pd.Series(flat.astype(np.float64), index=index)
    return pd.Series([_text(value, spec.name, source, row) for row, value in enumerate(flat)],
                     index=index, dtype=object)


def _text(value: object, name: str, source: str, row: int) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise EventValidationError(source, name, f"{value[:40]!r} is not UTF-8 text", [row]) from None
    if isinstance(value, str):
        return value
    raise EventValidationError(
        source, name, f"{value!r} is a {type(value).__name__}; expected text (BYTES)", [row]
    )


def _cursors(cursors: pd.Series | None, rows: int, source: str) -> tuple[str | None, np.ndarray]:
    """The one consumer named by the rows' cursors, and each row's position ('' for none)."""
    if cursors is None:
        return None, np.full(rows, "", dtype=object)
    parts = cursors.str.strip().str.rpartition(":")
    given = (cursors.str.strip() != "").to_numpy()
    consumers, positions = parts[0].to_numpy(dtype=object), parts[2].to_numpy(dtype=object)
    malformed = given & ~(
        (consumers != "") & pd.Series(positions).str.fullmatch(POSITION.pattern).to_numpy(dtype=bool)
    )
    if malformed.any():
        raise EventValidationError(
            source, CURSOR_FIELD,
            f"cursor {cursors[malformed].iloc[0]!r}; expected CONSUMER:POSITION, the position a "
            "line number or a stream id (worker-1:1042, worker-1:1719837000000-0)",
            cursors.index[malformed][:5],
        )
    names = sorted(set(consumers[given]))
    if len(names) > 1:
        raise EventValidationError(
            source, CURSOR_FIELD, f"cursors of several consumers {names[:3]}; expected one "
            "consumer per request", cursors.index[given][:5],
        )
    return (names[0] if names else None), np.where(given, positions, "")
