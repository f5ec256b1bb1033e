"""Twin state store: every customer's live twin state, keyed by (model, version, customer).

Customers are stored under their pseudonymous key (HMAC-SHA256 of the id,
``fintwin.live.pseudonyms``), never their id: callers pass and get ids, the store hashes them.

A state is a few named arrays with one fixed layout per model version (the step graph's
recurrent state or key/value window and its running features). The layout (names, shapes,
dtypes) is stored once per version (``declare``); a customer's state is stored as the raw
little-endian bytes of its arrays one after another, next to the customer's sequence number
(events applied so far) and the timestamp of its last applied event. States of two versions
never mix: the version is part of every key, and a version's states are listed or deleted
together (``customer_ids``, ``delete_version``).

``apply`` writes a micro-batch of new states AND the consumer's position in its input stream
(a named cursor) in one transaction: after a crash at any point either both are stored or
neither, so resuming the stream after ``cursor(...)`` applies every event exactly once. Each
update carries its sequence number, which must be the stored one plus one (a customer's first
state may count any number of events: a state bootstrapped from a history); the comparison runs
inside the transaction (optimistic concurrency), so of two writers that stepped from the same
state only the first succeeds. An update that repeats an applied sequence number
(``duplicate``), skips one (``sequence-gap``) or whose event is older than the customer's last
applied event (``out-of-order``) is rejected for its customer, with the reason, and the rest
of the batch applies.

Alerts (``fintwin.live.alerts``) are stored next to the states, under the same customer key
(``customer_key``), each with its inputs, as one JSON record per (customer, sequence number,
kind): an update's alerts are written in its transaction when it applies (an event's alerts
are stored exactly once, with the state they were computed from); ``record_alerts`` adds
alerts found without an event (the overdue sweep), keeping the first record of a key.
``states`` lists a version's stored states in batches (the sweep reads them all).

Backends: ``SQLiteStateStore`` (embedded default, one file) and ``RedisStateStore``
(production); ``open_store(url)`` opens either.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import sqlite3
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

import numpy as np
import redis

from fintwin.errors import FintwinInputError
from fintwin.live.pseudonyms import CustomerKeys, local_keys, read_secret, shared_keys

LAYOUT_FORMAT = 1  # stored with every layout; a reader refuses formats it does not know
STATE_DTYPES = (np.dtype(np.float32), np.dtype(np.int64))
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # Triton model names (directories); no ':' or glob
INT64 = np.iinfo(np.int64)
FILE_MODE = 0o600  # the SQLite file (and its -wal and -shm files, which SQLite gives its mode)
LOOKUP_CHUNK = 500  # customers per SQL IN (...) or Redis MGET
SCAN_BATCH = 1000  # states per batch of ``StateStore.states``


class StateStoreError(RuntimeError):
    """The store cannot be reached or holds data this version of fintwin cannot read."""


class UnknownCustomerError(FintwinInputError):
    """The store holds no state for this customer under this model version."""


class RejectReason(StrEnum):
    """Why one update of a batch was not applied (its customer's state is unchanged)."""

    DUPLICATE = "duplicate"  # its sequence number is applied already
    SEQUENCE_GAP = "sequence-gap"  # its sequence number skips one or more
    OUT_OF_ORDER = "out-of-order"  # its event is older than the last applied one


@dataclass(frozen=True)
class FieldSpec:
    """One named array of a state: its fixed shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def describe(self) -> str:
        return f"{self.dtype} array of shape {self.shape}"


@dataclass(frozen=True)
class StateLayout:
    """The arrays a model version's state is made of (sorted by name), and their codec."""

    fields: tuple[FieldSpec, ...]

    @classmethod
    def of(cls, arrays: Mapping[str, tuple[Sequence[int], str | np.dtype]]) -> StateLayout:
        """A layout from ``{name: (shape, dtype)}``, e.g. ``{"h": ((1, 128), "float32")}``."""
        if not arrays:
            raise FintwinInputError("a state layout needs at least one array")
        return cls(tuple(field_spec(name, *arrays[name]) for name in sorted(arrays)))

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Where each field starts in an encoded state, and (last) where the state ends."""
        return (0, *itertools.accumulate(spec.nbytes for spec in self.fields))

    @property
    def nbytes(self) -> int:
        """Bytes of one customer's encoded state."""
        return self.offsets[-1]

    def describe(self) -> str:
        return ", ".join(f"{spec.name}: {spec.describe()}" for spec in self.fields)

    def to_json(self) -> str:
        fields = [[spec.name, list(spec.shape), spec.dtype.name] for spec in self.fields]
        return json.dumps({"format": LAYOUT_FORMAT, "fields": fields})

    @classmethod
    def from_json(cls, text: str | bytes) -> StateLayout:
        payload = json.loads(text)
        if payload.get("format") != LAYOUT_FORMAT:
            raise StateStoreError(
                f"stored state layout has format {payload.get('format')!r}; this fintwin reads "
                f"format {LAYOUT_FORMAT}: upgrade fintwin"
            )
        return cls(
            tuple(field_spec(name, shape, dtype) for name, shape, dtype in payload["fields"])
        )

    def encode(self, customer_id: str, arrays: Mapping[str, np.ndarray]) -> bytes:
        """The raw little-endian bytes of ``arrays``, checked against the layout."""
        one_row = {name: value[None] if isinstance(value, np.ndarray) else value
                   for name, value in arrays.items()}
        return self.encode_rows([customer_id], one_row)[0]

    def encode_rows(self, customer_ids: Sequence[str],
                    arrays: Mapping[str, np.ndarray]) -> list[bytes]:
        """The encoded states of several customers from stacked arrays (field -> array of
        shape ``(len(customer_ids), *field shape)``), checked against the layout."""
        names = {spec.name for spec in self.fields}
        unexpected = sorted(set(arrays) - names)
        if unexpected:
            raise FintwinInputError(
                f"state of customer {customer_ids[0]!r}: unexpected field {unexpected[0]!r}; "
                f"the layout holds {self.describe()}"
            )
        rows = len(customer_ids)
        block = np.concatenate(
            [checked_rows(customer_ids, spec, arrays.get(spec.name)).reshape(rows, -1)
             .view(np.uint8) for spec in self.fields],
            axis=1,
        )
        return [row.tobytes() for row in block]

    def decode_many(self, blobs: Sequence[bytes],
                    names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The fields ``names`` (all when None) of many encoded states, each ``[n, *shape]``."""
        wanted = set(names) if names is not None else None
        unknown = sorted((wanted or set()) - {spec.name for spec in self.fields})
        if unknown:
            raise FintwinInputError(
                f"state fields {unknown}: not in the layout ({self.describe()})"
            )
        if any(len(blob) != self.nbytes for blob in blobs):
            raise StateStoreError(
                f"a stored state does not hold the {self.nbytes} bytes of its layout: the store "
                "is damaged or was written by another program"
            )
        rows = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), self.nbytes)
        return {
            spec.name: rows[:, offset : offset + spec.nbytes].copy()
            .view(spec.dtype.newbyteorder("<")).astype(spec.dtype, copy=False)
            .reshape(len(blobs), *spec.shape)
            for spec, offset in zip(self.fields, self.offsets, strict=False)
            if wanted is None or spec.name in wanted
        }

    def decode(self, blob: bytes) -> dict[str, np.ndarray]:
        """The arrays of one encoded state (writable copies)."""
        return {name: value[0] for name, value in self.decode_many([blob]).items()}


def field_spec(name: str, shape: Sequence[int], dtype: str | np.dtype) -> FieldSpec:
    """A checked ``FieldSpec``: a non-empty name, positive dimensions, float32 or int64."""
    if not isinstance(name, str) or not name:
        raise FintwinInputError(f"state field name {name!r}: expected a non-empty string")
    dims = tuple(shape)
    if not all(isinstance(dim, int | np.integer) and dim >= 1 for dim in dims):
        raise FintwinInputError(f"state field {name!r}: shape {dims} must hold positive integers")
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise FintwinInputError(f"state field {name!r}: unknown dtype {dtype!r}") from exc
    if resolved not in STATE_DTYPES:
        raise FintwinInputError(
            f"state field {name!r}: dtype {resolved} is not supported; expected float32 or int64"
        )
    return FieldSpec(name, tuple(int(dim) for dim in dims), resolved)


def checked_rows(customer_ids: Sequence[str], spec: FieldSpec, array: object) -> np.ndarray:
    """One field of several customers' states (rows in ``customer_ids`` order) as
    little-endian values; a missing field, another dtype or shape, or NaN/inf is refused."""
    where = f"state of customer {customer_ids[0]!r}, field {spec.name!r}"
    if array is None:
        raise FintwinInputError(f"{where}: missing; expected {spec.describe()}")
    rows = (len(customer_ids), *spec.shape)
    if not isinstance(array, np.ndarray) or array.dtype != spec.dtype or array.shape != rows:
        got = (
            f"{array.dtype} array of shape {array.shape[1:]}"
            if isinstance(array, np.ndarray)
            else type(array).__name__
        )
        raise FintwinInputError(f"{where}: expected {spec.describe()}, got {got}")
    if spec.dtype.kind == "f":
        bad = ~np.isfinite(array.reshape(len(customer_ids), -1)).all(axis=1)
        if bad.any():
            first = customer_ids[int(np.argmax(bad))]
            raise FintwinInputError(
                f"state of customer {first!r}, field {spec.name!r}: holds NaN or inf"
            )
    return np.ascontiguousarray(array, dtype=spec.dtype.newbyteorder("<"))


@dataclass(frozen=True)
class StateUpdate:
    """A customer's new state after one event.

    ``seq`` is this event's sequence number for the customer: the stored one plus one (for a
    customer without state: 1, or the events a bootstrapped state holds). ``timestamp_ns``: the event's time, nanoseconds since the Unix
    epoch (UTC), as ``pandas.Timestamp.value``.
    """

    customer_id: str
    seq: int
    timestamp_ns: int
    arrays: Mapping[str, np.ndarray]
    alerts: tuple[tuple[str, str], ...] = ()  # (kind, JSON record) raised by this event


@dataclass(frozen=True)
class AlertRecord:
    """A stored alert: the customer's key in the store (``StateStore.customer_key``), the
    sequence number of the event it belongs to (for an overdue customer: its last event),
    its kind and its JSON record (inputs included)."""

    customer_key: str
    seq: int
    kind: str
    record: str


@dataclass(frozen=True)
class StateBatch:
    """New states of several customers as stacked arrays (``StateUpdate``s in columns):
    row ``i`` is ``customer_ids[i]``'s state after its event ``seq[i]`` at
    ``timestamp_ns[i]``; ``arrays``: field -> array of shape ``(rows, *field shape)``."""

    customer_ids: Sequence[str]
    seq: np.ndarray
    timestamp_ns: np.ndarray
    arrays: Mapping[str, np.ndarray]
    alerts: Sequence[tuple[tuple[str, str], ...]] = ()  # per row, as ``StateUpdate.alerts``

    def __len__(self) -> int:
        return len(self.customer_ids)


@dataclass(frozen=True)
class StateRows:
    """States of several customers as stacked arrays (``StateStore.get_rows``): ``found``
    tells which customers have one; the others' rows are zeros."""

    found: np.ndarray  # bool
    seq: np.ndarray  # int64
    timestamp_ns: np.ndarray  # int64
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class TwinState:
    """A customer's stored state: its arrays, events applied, the last event's time."""

    seq: int
    timestamp_ns: int
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class StoredStates:
    """Stored states of several customers as arrays: their keys (``StateStore.customer_key``),
    events applied, last event times and the requested fields, each ``[n, *shape]``."""

    keys: list[str]
    seq: np.ndarray
    timestamp_ns: np.ndarray
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class StreamPosition:
    """A named consumer's position in its input stream (a file offset, a Redis stream id)."""

    name: str
    position: str


@dataclass(frozen=True)
class Rejection:
    """An update of a batch that was not applied: its index in the batch, and why."""

    index: int
    customer_id: str
    reason: RejectReason
    message: str


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did: the indexes of the updates applied, and those rejected."""

    applied: tuple[int, ...]
    rejected: tuple[Rejection, ...]


@dataclass(frozen=True)
class StateLookup:
    """States found by ``get``, and the customers the store holds none for."""

    model: str
    version: int
    states: dict[str, TwinState]
    unknown: tuple[str, ...]

    def require(self, customer_id: str) -> TwinState:
        """The customer's state; ``UnknownCustomerError`` when it has none."""
        if customer_id not in self.states:
            raise UnknownCustomerError(
                f"unknown customer {customer_id!r}: no twin state for model {self.model!r} "
                f"version {self.version}"
            )
        return self.states[customer_id]


@dataclass(frozen=True)
class Mark:
    """A customer's stored sequence number and last event time (what updates are checked on)."""

    seq: int
    timestamp_ns: int


@dataclass(frozen=True)
class EncodedUpdate:
    customer_id: str
    seq: int
    timestamp_ns: int
    state: bytes
    alerts: tuple[tuple[str, str], ...] = ()


Verdict = tuple[RejectReason | None, Mark | None]  # per update: why rejected, the stored mark


def judge(update: EncodedUpdate, stored: Mark | None) -> RejectReason | None:
    """Whether ``update`` may follow the stored state (None), or why not.

    The Lua script of ``RedisStateStore`` applies the same rule; both backends run one test
    suite.
    """
    stored_seq = stored.seq if stored else 0
    if update.seq <= stored_seq:
        return RejectReason.DUPLICATE
    if stored is not None and update.seq > stored_seq + 1:
        return RejectReason.SEQUENCE_GAP
    if stored is not None and update.timestamp_ns < stored.timestamp_ns:
        return RejectReason.OUT_OF_ORDER
    return None


def rejection_message(update: EncodedUpdate, reason: RejectReason, stored: Mark | None) -> str:
    stored_seq = stored.seq if stored else 0
    who = f"customer {update.customer_id!r}: event {update.seq}"
    if reason is RejectReason.DUPLICATE:
        return (
            f"{who} is applied already (stored: {stored_seq} events); a replayed event, or "
            "another writer stepped from the same state first: read the state again"
        )
    if reason is RejectReason.SEQUENCE_GAP:
        return f"{who} skips events (stored: {stored_seq} events, next is {stored_seq + 1})"
    return (
        f"{who} at {iso_time(update.timestamp_ns)} is older than the last applied event at "
        f"{iso_time(stored.timestamp_ns)}"
    )


def iso_time(timestamp_ns: int) -> str:
    return str(np.datetime64(timestamp_ns, "ns"))


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def batches(items: Iterable, size: int) -> Iterator[list]:
    """``items`` (any iterable, read lazily) in lists of ``size``."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def check_model(model: str, version: int) -> None:
    if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
        raise FintwinInputError(f"model name {model!r}: expected letters, digits, '_', '.' or '-'")
    if not isinstance(version, int | np.integer) or isinstance(version, bool) or version < 1:
        raise FintwinInputError(f"model {model!r}: version {version!r} must be an integer >= 1")


def check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise FintwinInputError(f"{what} {value!r}: expected a non-empty string")
    return value


def check_int64(where: str, what: str, value: object, low: int) -> int:
    if (
        not isinstance(value, int | np.integer)
        or isinstance(value, bool)
        or not low <= value <= INT64.max
    ):
        raise FintwinInputError(
            f"{where}: {what} {value!r} must be an integer in [{low}, {INT64.max}]"
        )
    return int(value)


def encode_update(layout: StateLayout, update: StateUpdate) -> EncodedUpdate:
    customer_id = check_name("customer id", update.customer_id)
    where = f"update of customer {customer_id!r}"
    return EncodedUpdate(
        customer_id,
        check_int64(where, "sequence number", update.seq, 1),
        check_int64(where, "timestamp_ns", update.timestamp_ns, INT64.min),
        layout.encode(customer_id, update.arrays),
        tuple((check_name(f"{where}: alert kind", kind), record) for kind, record in update.alerts),
    )


def encode_batch(layout: StateLayout, batch: StateBatch) -> list[EncodedUpdate]:
    """A batch's updates encoded at once (the checks of ``encode_update``, by column)."""
    ids = [check_name("customer id", cid) for cid in batch.customer_ids]
    seq = np.asarray(batch.seq)
    timestamps = np.asarray(batch.timestamp_ns)
    for what, values, low in (("sequence number", seq, 1), ("timestamp_ns", timestamps, INT64.min)):
        bad = np.ones(len(ids), bool) if values.dtype.kind not in "iu" else values < low
        if values.shape != (len(ids),) or bad.any():
            row = int(np.argmax(bad)) if values.shape == (len(ids),) else 0
            value = values[row] if values.shape == (len(ids),) else values
            check_int64(f"update of customer {ids[row]!r}", what, value, low)
    states = layout.encode_rows(ids, batch.arrays) if ids else []
    alerts = batch.alerts or [()] * len(ids)
    if len(alerts) != len(ids):
        raise FintwinInputError(f"a batch of {len(ids)} updates with {len(alerts)} alert rows")
    return [
        EncodedUpdate(cid, int(n), int(ts), state,
                      tuple((check_name(f"update of customer {cid!r}: alert kind", kind), record)
                            for kind, record in raised))
        for cid, n, ts, state, raised in zip(ids, seq.tolist(), timestamps.tolist(), states,
                                             alerts, strict=True)
    ]


class StateStore(ABC):
    """Twin states keyed by (model, version, customer), with the input streams' positions.

    A store is safe to share between threads; several processes may open the same store.
    """

    def __init__(self, customer_keys: CustomerKeys) -> None:
        self._layouts: dict[tuple[str, int], StateLayout] = {}
        self.customer_keys = customer_keys

    def declare(self, model: str, version: int, layout: StateLayout) -> None:
        """Record ``layout`` as the state of ``model`` version ``version`` (once per version;
        declaring it again with the same layout is a no-op, with another one an error)."""
        check_model(model, version)
        stored = self._declare_layout(model, version, layout.to_json())
        if stored is not None and StateLayout.from_json(stored) != layout:
            raise FintwinInputError(
                f"model {model!r} version {version} holds twin states of another layout "
                f"({StateLayout.from_json(stored).describe()}), not {layout.describe()}: "
                "serve the new model under a new version"
            )
        self._layouts[model, version] = layout

    def layout(self, model: str, version: int) -> StateLayout:
        """The declared layout of ``model`` version ``version``."""
        check_model(model, version)
        if (model, version) not in self._layouts:
            stored = self._read_layout(model, version)
            if stored is None:
                raise self._undeclared(model, version)
            self._layouts[model, version] = StateLayout.from_json(stored)
        return self._layouts[model, version]

    def apply(
        self,
        model: str,
        version: int,
        updates: Sequence[StateUpdate] | StateBatch,
        stream_position: StreamPosition | None = None,
    ) -> ApplyResult:
        """Write the updates that follow their customers' stored states, and the stream
        position, in one transaction. Updates are checked in order, so a batch may hold
        several consecutive events of one customer. A bad update (arrays that do not fit the
        layout, a bad sequence number) raises ``FintwinInputError`` and nothing is written."""
        layout = self.layout(model, version)
        encoded = (encode_batch(layout, updates) if isinstance(updates, StateBatch)
                   else [encode_update(layout, update) for update in updates])
        if stream_position is not None:
            check_name("stream cursor name", stream_position.name)
            check_name(
                f"stream cursor {stream_position.name!r}: position", stream_position.position
            )
        keyed = [EncodedUpdate(key, u.seq, u.timestamp_ns, u.state, u.alerts) for key, u in
                 zip(self.customer_keys.keys(u.customer_id for u in encoded), encoded, strict=True)]
        verdicts = self._apply(model, version, keyed, stream_position)
        if verdicts is None:  # deleted since this store read its layout
            self._layouts.pop((model, version), None)
            raise self._undeclared(model, version)
        applied, rejected = [], []
        for index, (update, (reason, stored)) in enumerate(zip(encoded, verdicts, strict=True)):
            if reason is None:
                applied.append(index)
            else:
                message = rejection_message(update, reason, stored)
                rejected.append(Rejection(index, update.customer_id, reason, message))
        return ApplyResult(tuple(applied), tuple(rejected))

    def get(self, model: str, version: int, customer_ids: Iterable[str]) -> StateLookup:
        """The stored states of ``customer_ids`` (one consistent snapshot)."""
        wanted = list(dict.fromkeys(customer_ids))
        rows = self.get_rows(model, version, wanted)
        states = {
            cid: TwinState(int(rows.seq[i]), int(rows.timestamp_ns[i]),
                           {name: value[i] for name, value in rows.arrays.items()})
            for i, cid in enumerate(wanted)
            if rows.found[i]
        }
        return StateLookup(model, version, states, tuple(cid for cid in wanted if cid not in states))

    def get_rows(self, model: str, version: int, customer_ids: Sequence[str]) -> StateRows:
        """The stored states of ``customer_ids`` as stacked arrays, one row per id in order
        (one consistent snapshot); rows of customers without a state are zeros."""
        layout = self.layout(model, version)
        ids = self.customer_keys.keys(check_name("customer id", cid) for cid in customer_ids)
        found = self._get(model, version, list(dict.fromkeys(ids)))
        present = np.array([cid in found for cid in ids], dtype=bool)
        blobs = [found[cid][1] if cid in found else bytes(layout.nbytes) for cid in ids]
        marks = [found[cid][0] if cid in found else Mark(0, 0) for cid in ids]
        return StateRows(
            present,
            np.array([mark.seq for mark in marks], dtype=np.int64),
            np.array([mark.timestamp_ns for mark in marks], dtype=np.int64),
            layout.decode_many(blobs),
        )

    def cursor(self, model: str, version: int, name: str) -> str | None:
        """The last position stored by the consumer ``name``, None before its first batch."""
        check_model(model, version)
        return self._cursor(model, version, check_name("stream cursor name", name))

    def versions(self, model: str) -> list[int]:
        """The versions of ``model`` with a declared layout, ascending."""
        check_model(model, 1)
        return sorted(self._versions(model))

    def customer_ids(self, model: str, version: int) -> list[str]:
        """The pseudonymous keys (``customer_keys``) of every customer with a state under
        ``model`` version ``version``, sorted."""
        check_model(model, version)
        return sorted(self._customer_ids(model, version))

    def states(self, model: str, version: int, fields: Iterable[str] | None = None,
               batch: int = SCAN_BATCH) -> Iterator[StoredStates]:
        """Every stored state of ``model`` version ``version``, in batches of up to ``batch``
        customers in no particular order, with the state fields ``fields`` (all when None);
        states written meanwhile may or may not be seen."""
        layout = self.layout(model, version)
        names = None if fields is None else list(fields)
        for rows in self._scan_states(model, version, batch):
            if rows:
                yield StoredStates(
                    [key for key, _, _ in rows],
                    np.array([mark.seq for _, mark, _ in rows], dtype=np.int64),
                    np.array([mark.timestamp_ns for _, mark, _ in rows], dtype=np.int64),
                    layout.decode_many([blob for _, _, blob in rows], names),
                )

    def customer_key(self, customer_id: str) -> str:
        """The key a customer's state and alerts are stored under (``states`` lists them):
        its pseudonym (``customer_keys``)."""
        return self.customer_keys.key(check_name("customer id", customer_id))

    def record_alerts(self, model: str, version: int,
                      alerts: Sequence[AlertRecord]) -> list[bool]:
        """Store alerts found without an event (keyed by ``AlertRecord.customer_key``); per
        alert, whether it is new (a key stored already keeps its first record)."""
        check_model(model, version)
        for alert in alerts:
            check_name("alert customer key", alert.customer_key)
            check_name("alert kind", alert.kind)
            check_int64(f"alert of {alert.customer_key!r}", "sequence number", alert.seq, 0)
        return self._record_alerts(model, version, alerts)

    def alerts(self, model: str, version: int,
               customer_ids: Iterable[str] | None = None) -> list[AlertRecord]:
        """The stored alerts of ``customer_ids`` (all customers when None), by customer key,
        then sequence number and kind."""
        check_model(model, version)
        keys = None if customer_ids is None else [self.customer_key(c) for c in customer_ids]
        return sorted(self._alerts(model, version, keys),
                      key=lambda a: (a.customer_key, a.seq, a.kind))

    def delete_version(self, model: str, version: int) -> int:
        """Remove a version's states, alerts, cursors and layout; returns the states removed.
        Stop the version's writers first."""
        check_model(model, version)
        self._layouts.pop((model, version), None)
        return self._delete_version(model, version)

    def _undeclared(self, model: str, version: int) -> FintwinInputError:
        return FintwinInputError(
            f"model {model!r} version {version} has no twin states in this store (its layout is "
            f"not declared); versions with states: {self._versions(model) or 'none'}"
        )

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""

    @abstractmethod
    def _declare_layout(self, model: str, version: int, layout: str) -> str | None:
        """Store ``layout`` unless the version has one; return the one it had, if any."""

    @abstractmethod
    def _read_layout(self, model: str, version: int) -> str | None: ...

    @abstractmethod
    def _apply(
        self,
        model: str,
        version: int,
        updates: Sequence[EncodedUpdate],
        position: StreamPosition | None,
    ) -> list[Verdict] | None:
        """In one transaction: judge and write each update in order, then the position;
        None (and nothing written) when the version has no layout."""

    @abstractmethod
    def _get(
        self, model: str, version: int, customer_ids: Sequence[str]
    ) -> dict[str, tuple[Mark, bytes]]: ...

    @abstractmethod
    def _cursor(self, model: str, version: int, name: str) -> str | None: ...

    @abstractmethod
    def _versions(self, model: str) -> list[int]: ...

    @abstractmethod
    def _customer_ids(self, model: str, version: int) -> list[str]: ...

    @abstractmethod
    def _delete_version(self, model: str, version: int) -> int: ...

    @abstractmethod
    def _scan_states(self, model: str, version: int,
                     batch: int) -> Iterator[list[tuple[str, Mark, bytes]]]: ...

    @abstractmethod
    def _record_alerts(self, model: str, version: int,
                       alerts: Sequence[AlertRecord]) -> list[bool]: ...

    @abstractmethod
    def _alerts(self, model: str, version: int,
                keys: Sequence[str] | None) -> list[AlertRecord]: ...


SQLITE_TABLES = (
    """CREATE TABLE IF NOT EXISTS layouts (
        model TEXT NOT NULL, version INTEGER NOT NULL, layout TEXT NOT NULL,
        PRIMARY KEY (model, version))""",
    """CREATE TABLE IF NOT EXISTS states (
        model TEXT NOT NULL, version INTEGER NOT NULL, customer TEXT NOT NULL,
        seq INTEGER NOT NULL, timestamp_ns INTEGER NOT NULL, state BLOB NOT NULL,
        PRIMARY KEY (model, version, customer))""",
    """CREATE TABLE IF NOT EXISTS cursors (
        model TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,
        position TEXT NOT NULL, PRIMARY KEY (model, version, name))""",
    """CREATE TABLE IF NOT EXISTS alerts (
        model TEXT NOT NULL, version INTEGER NOT NULL, customer TEXT NOT NULL,
        seq INTEGER NOT NULL, kind TEXT NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (model, version, customer, seq, kind))""",
)
SQLITE_ADD_ALERT = "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"


class SQLiteStateStore(StateStore):
    """States in one SQLite file (created with mode 0600), for one machine.

    WAL journal: readers never wait for the writer, and a killed process leaves the last
    committed transaction. ``synchronous=FULL``: a transaction is on disk when ``apply``
    returns, so a consumer that acknowledges its input (or moves on from stdin) after
    ``apply`` loses nothing even to a power cut; it costs one fsync per micro-batch.
    Writers take the write lock when their transaction begins (``BEGIN IMMEDIATE``), so the
    sequence numbers are compared and written with no other writer in between; a writer waits
    up to ``busy_timeout_s`` for the lock.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0,
                 customer_keys: CustomerKeys | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(customer_keys or local_keys(self.path))
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        try:
            journal = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            with self._transaction() as db:
                for table in SQLITE_TABLES:
                    db.execute(table)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise FintwinInputError(
                f"state store {self.path}: not a usable SQLite file ({exc})"
            ) from exc
        if journal != "wal":
            self._db.close()
            raise StateStoreError(
                f"state store {self.path}: SQLite refused WAL mode (journal {journal!r}); "
                "put the file on a local file system"
            )

    @contextlib.contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute(begin)
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def _declare_layout(self, model: str, version: int, layout: str) -> str | None:
        with self._transaction() as db:
            stored = self._layout_in(db, model, version)
            if stored is None:
                db.execute("INSERT INTO layouts VALUES (?, ?, ?)", (model, version, layout))
        return stored

    def _read_layout(self, model: str, version: int) -> str | None:
        with self._transaction("BEGIN") as db:
            return self._layout_in(db, model, version)

    @staticmethod
    def _layout_in(db: sqlite3.Connection, model: str, version: int) -> str | None:
        row = db.execute(
            "SELECT layout FROM layouts WHERE model = ? AND version = ?", (model, version)
        ).fetchone()
        return row[0] if row else None

    def _apply(
        self,
        model: str,
        version: int,
        updates: Sequence[EncodedUpdate],
        position: StreamPosition | None,
    ) -> list[Verdict] | None:
        verdicts = []
        with self._transaction() as db:
            if self._layout_in(db, model, version) is None:
                return None
            for update in updates:
                row = db.execute(
                    "SELECT seq, timestamp_ns FROM states WHERE model = ? AND version = ? AND customer = ?",
                    (model, version, update.customer_id),
                ).fetchone()
                stored = Mark(*row) if row else None
                reason = judge(update, stored)
                if reason is None:
                    db.execute(
                        "INSERT INTO states VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                        "seq = excluded.seq, timestamp_ns = excluded.timestamp_ns, state = excluded.state",
                        (
                            model,
                            version,
                            update.customer_id,
                            update.seq,
                            update.timestamp_ns,
                            update.state,
                        ),
                    )
                    db.executemany(SQLITE_ADD_ALERT, [
                        (model, version, update.customer_id, update.seq, kind, record)
                        for kind, record in update.alerts
                    ])
                verdicts.append((reason, stored))
            if position is not None:
                db.execute(
                    "INSERT INTO cursors VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET position = excluded.position",
                    (model, version, position.name, position.position),
                )
        return verdicts

    def _get(
        self, model: str, version: int, customer_ids: Sequence[str]
    ) -> dict[str, tuple[Mark, bytes]]:
        found = {}
        with self._transaction("BEGIN") as db:
            for chunk in chunks(customer_ids, LOOKUP_CHUNK):
                rows = db.execute(
                    "SELECT customer, seq, timestamp_ns, state FROM states WHERE model = ? AND version = ? "
                    f"AND customer IN ({', '.join('?' * len(chunk))})",
                    (model, version, *chunk),
                )
                found.update({cid: (Mark(seq, ts), state) for cid, seq, ts, state in rows})
        return found

    def _cursor(self, model: str, version: int, name: str) -> str | None:
        with self._transaction("BEGIN") as db:
            row = db.execute(
                "SELECT position FROM cursors WHERE model = ? AND version = ? AND name = ?",
                (model, version, name),
            ).fetchone()
        return row[0] if row else None

    def _versions(self, model: str) -> list[int]:
        with self._transaction("BEGIN") as db:
            return [
                v for (v,) in db.execute("SELECT version FROM layouts WHERE model = ?", (model,))
            ]

    def _customer_ids(self, model: str, version: int) -> list[str]:
        with self._transaction("BEGIN") as db:
            rows = db.execute(
                "SELECT customer FROM states WHERE model = ? AND version = ?", (model, version)
            )
            return [cid for (cid,) in rows]

    def _scan_states(self, model: str, version: int,
                     batch: int) -> Iterator[list[tuple[str, Mark, bytes]]]:
        after = ""  # keyset pagination: each batch is its own short read transaction
        while True:
            with self._transaction("BEGIN") as db:
                rows = db.execute(
                    "SELECT customer, seq, timestamp_ns, state FROM states WHERE model = ? AND "
                    "version = ? AND customer > ? ORDER BY customer LIMIT ?",
                    (model, version, after, batch),
                ).fetchall()
            if not rows:
                return
            yield [(key, Mark(seq, ts), state) for key, seq, ts, state in rows]
            after = rows[-1][0]

    def _record_alerts(self, model: str, version: int,
                       alerts: Sequence[AlertRecord]) -> list[bool]:
        with self._transaction() as db:
            return [
                db.execute(SQLITE_ADD_ALERT, (model, version, a.customer_key, a.seq, a.kind,
                                              a.record)).rowcount == 1
                for a in alerts
            ]

    def _alerts(self, model: str, version: int,
                keys: Sequence[str] | None) -> list[AlertRecord]:
        query = "SELECT customer, seq, kind, record FROM alerts WHERE model = ? AND version = ?"
        found = []
        with self._transaction("BEGIN") as db:
            if keys is None:
                found = db.execute(query, (model, version)).fetchall()
            for chunk in chunks(keys or [], LOOKUP_CHUNK):
                found += db.execute(
                    f"{query} AND customer IN ({', '.join('?' * len(chunk))})",
                    (model, version, *chunk),
                ).fetchall()
        return [AlertRecord(*row) for row in found]

    def _delete_version(self, model: str, version: int) -> int:
        with self._transaction() as db:
            removed = db.execute(
                "DELETE FROM states WHERE model = ? AND version = ?", (model, version)
            ).rowcount
            for table in ("alerts", "cursors", "layouts"):
                db.execute(f"DELETE FROM {table} WHERE model = ? AND version = ?", (model, version))
        return removed


REDIS_PASSWORD_FILE_ENV = "FINTWIN_REDIS_PASSWORD_FILE"  # the password, kept out of the URL
REDIS_HEADER = struct.Struct("<qq")  # seq, timestamp_ns; then the state's bytes

# KEYS: layout, cursors hash, one state key per update (n), then one alerts hash per alert;
# ARGV: cursor name ('' for none), position, n, one value (header + state) per update, then per
# alert: its update's number (1..n), its field (SEQ:KIND) and its record, stored (HSETNX) when
# that update applies. Returns, per update, the reason it was rejected ('' when applied) and
# the stored header before it ('' when none). A timestamp is compared as (high int32, low
# uint32): Lua numbers are doubles, exact to 2^53 only.
REDIS_APPLY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('fintwin: undeclared') end
local n = tonumber(ARGV[3])
local verdicts, applied = {}, {}
for u = 1, n do
  local i, value = u + 2, ARGV[u + 3]
  local seq, lo, hi = struct.unpack('<i8I4i4', value)
  local old = redis.call('GET', KEYS[i])
  local old_seq, old_lo, old_hi = 0, 0, 0
  if old then old_seq, old_lo, old_hi = struct.unpack('<i8I4i4', old) end
  local reason = ''
  if seq <= old_seq then reason = 'duplicate'
  elseif old and seq > old_seq + 1 then reason = 'sequence-gap'
  elseif old and (hi < old_hi or (hi == old_hi and lo < old_lo)) then reason = 'out-of-order'
  else redis.call('SET', KEYS[i], value); applied[u] = true end
  verdicts[#verdicts + 1] = reason
  verdicts[#verdicts + 1] = old and string.sub(old, 1, 16) or ''
end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
for a = 1, #KEYS - 2 - n do
  local at = n + 1 + 3 * a
  if applied[tonumber(ARGV[at])] then redis.call('HSETNX', KEYS[2 + n + a], ARGV[at + 1], ARGV[at + 2]) end
end
return verdicts
"""


class RedisStateStore(StateStore):
    """States in Redis, for production (several machines, Triton instances and workers).

    Keys: ``fintwin:{MODEL:VERSION}:state:CUSTOMER`` (header: sequence number and timestamp,
    then the state's bytes), ``...:alerts:CUSTOMER`` (a hash: ``SEQ:KIND`` -> record),
    ``...:cursors`` (a hash: consumer -> position) and ``...:layout``.
    A version's keys share a Redis Cluster hash slot, so the Lua script that judges and writes
    a batch and its position (atomically, in one round trip) is legal on a cluster too.
    Durability is the server's: run it with ``appendonly yes`` (``appendfsync always`` to keep
    every applied batch through a power cut; ``everysec`` may lose the last second, states and
    position together). In production the server requires a password and speaks TLS
    (``rediss://`` URLs); the password comes from the URL or, kept out of it, from the file
    ``$FINTWIN_REDIS_PASSWORD_FILE``.
    """

    def __init__(self, url: str, customer_keys: CustomerKeys | None = None) -> None:
        self._redis = redis_client(url)
        options = self._redis.connection_pool.connection_kwargs
        where = options.get("path") or f"{options.get('host')}:{options.get('port')}"
        try:
            super().__init__(customer_keys or shared_keys(where))
        except FintwinInputError:
            self._redis.close()
            raise
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            self._redis.close()
            raise StateStoreError(
                f"state store: no Redis server answers at {where} ({exc})"
            ) from exc
        self._apply_script = self._redis.register_script(REDIS_APPLY)

    @staticmethod
    def _prefix(model: str, version: int) -> str:
        return f"fintwin:{{{model}:{version}}}:"

    def close(self) -> None:
        self._redis.close()

    def _declare_layout(self, model: str, version: int, layout: str) -> str | None:
        return self._redis.set(self._prefix(model, version) + "layout", layout, nx=True, get=True)

    def _read_layout(self, model: str, version: int) -> str | None:
        return self._redis.get(self._prefix(model, version) + "layout")

    def _apply(
        self,
        model: str,
        version: int,
        updates: Sequence[EncodedUpdate],
        position: StreamPosition | None,
    ) -> list[Verdict] | None:
        prefix = self._prefix(model, version)
        keys = [prefix + "layout", prefix + "cursors"]
        keys += [f"{prefix}state:{update.customer_id}" for update in updates]
        args = [position.name, position.position] if position else ["", ""]
        args += [len(updates)]
        args += [REDIS_HEADER.pack(u.seq, u.timestamp_ns) + u.state for u in updates]
        for number, update in enumerate(updates, start=1):
            for kind, record in update.alerts:
                keys.append(f"{prefix}alerts:{update.customer_id}")
                args += [number, f"{update.seq}:{kind}", record]
        try:
            replies = self._apply_script(keys=keys, args=args)
        except redis.ResponseError as exc:
            if "fintwin: undeclared" in str(exc):
                return None
            raise
        return [
            (
                RejectReason(reason.decode()) if reason else None,
                Mark(*REDIS_HEADER.unpack(header)) if header else None,
            )
            for reason, header in zip(replies[::2], replies[1::2], strict=True)
        ]

    def _get(
        self, model: str, version: int, customer_ids: Sequence[str]
    ) -> dict[str, tuple[Mark, bytes]]:
        prefix = self._prefix(model, version) + "state:"
        found = {}
        for chunk in chunks(customer_ids, LOOKUP_CHUNK):
            values = self._redis.mget([prefix + cid for cid in chunk])
            found.update(
                {
                    cid: (Mark(*REDIS_HEADER.unpack_from(value)), value[REDIS_HEADER.size :])
                    for cid, value in zip(chunk, values, strict=True)
                    if value is not None
                }
            )
        return found

    def _cursor(self, model: str, version: int, name: str) -> str | None:
        position = self._redis.hget(self._prefix(model, version) + "cursors", name)
        return position.decode() if position is not None else None

    def _versions(self, model: str) -> list[int]:
        pattern = re.compile(rb"fintwin:\{" + re.escape(model.encode()) + rb":(\d+)\}:layout")
        keys = self._redis.scan_iter(match=f"fintwin:{{{model}:*}}:layout", count=1000)
        return [int(match[1]) for key in keys if (match := pattern.fullmatch(key))]

    def _state_keys(self, model: str, version: int) -> Iterator[bytes]:
        return self._redis.scan_iter(match=self._prefix(model, version) + "state:*", count=1000)

    def _customer_ids(self, model: str, version: int) -> list[str]:
        start = len((self._prefix(model, version) + "state:").encode())
        return [key[start:].decode() for key in self._state_keys(model, version)]

    def _scan_states(self, model: str, version: int,
                     batch: int) -> Iterator[list[tuple[str, Mark, bytes]]]:
        start = len((self._prefix(model, version) + "state:").encode())
        keys = self._redis.scan_iter(match=self._prefix(model, version) + "state:*", count=batch)
        for chunk in batches(keys, batch):
            values = self._redis.mget(chunk)
            yield [
                (key[start:].decode(), Mark(*REDIS_HEADER.unpack_from(value)),
                 value[REDIS_HEADER.size :])
                for key, value in zip(chunk, values, strict=True)
                if value is not None  # deleted since the scan saw it
            ]

    def _record_alerts(self, model: str, version: int,
                       alerts: Sequence[AlertRecord]) -> list[bool]:
        prefix = self._prefix(model, version) + "alerts:"
        with self._redis.pipeline(transaction=True) as pipe:
            for a in alerts:
                pipe.hsetnx(prefix + a.customer_key, f"{a.seq}:{a.kind}", a.record)
            return [bool(new) for new in pipe.execute()]

    def _alerts(self, model: str, version: int,
                keys: Sequence[str] | None) -> list[AlertRecord]:
        prefix = self._prefix(model, version) + "alerts:"
        if keys is None:
            start = len(prefix.encode())
            keys = [key[start:].decode()
                    for key in self._redis.scan_iter(match=prefix + "*", count=SCAN_BATCH)]
        with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(prefix + key)
            hashes = pipe.execute()
        found = []
        for key, fields in zip(keys, hashes, strict=True):
            for field_name, record in fields.items():
                seq, _, kind = field_name.decode().partition(":")
                found.append(AlertRecord(key, int(seq), kind, record.decode()))
        return found

    def _delete_version(self, model: str, version: int) -> int:
        removed = 0
        for chunk in chunks(list(self._state_keys(model, version)), LOOKUP_CHUNK):
            removed += self._redis.unlink(*chunk)
        alert_keys = self._redis.scan_iter(match=self._prefix(model, version) + "alerts:*",
                                           count=1000)
        for chunk in batches(alert_keys, LOOKUP_CHUNK):
            self._redis.unlink(*chunk)
        prefix = self._prefix(model, version)
        self._redis.unlink(prefix + "cursors", prefix + "layout")
        return removed


def redis_client(url: str) -> redis.Redis:
    """A client of the Redis server at ``url``, its password from the URL or else from the
    file ``$FINTWIN_REDIS_PASSWORD_FILE``."""
    password_file = os.environ.get(REDIS_PASSWORD_FILE_ENV, "")
    if not password_file:
        return redis.Redis.from_url(url)
    return redis.Redis.from_url(url, password=read_secret(Path(password_file),
                                                          REDIS_PASSWORD_FILE_ENV))


def open_store(url: str, customer_keys: CustomerKeys | None = None) -> StateStore:
    """The store at ``url``: ``sqlite:///PATH`` (``sqlite:////abs/twins.db`` for an absolute
    path) or a Redis URL (``redis://HOST:PORT/DB``, ``rediss://:PASSWORD@HOST:PORT/DB
    ?ssl_ca_certs=CA.pem``, ``unix://PATH``); customers keyed by ``customer_keys``, else as
    ``fintwin.live.pseudonyms`` configures."""
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SQLiteStateStore(url.removeprefix("sqlite:///"), customer_keys=customer_keys)
    if url.partition("://")[0] in ("redis", "rediss", "unix"):
        return RedisStateStore(url, customer_keys)
    raise FintwinInputError(
        f"state store {url!r}: expected sqlite:///PATH or redis://HOST:PORT[/DB]"
    )
