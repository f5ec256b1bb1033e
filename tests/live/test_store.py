"""Twin state store: the same tests on SQLite and on a real redis-server."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from fintwin.errors import FintwinInputError
from fintwin.live.store import (
    RejectReason,
    SQLiteStateStore,
    StateLayout,
    StateStore,
    StateUpdate,
    StreamPosition,
    UnknownCustomerError,
    open_store,
)

MODEL = "twin"
LAYOUT = StateLayout.of(
    {  # an LSTM (hidden 128, one layer) and 20 running features
        "h": ((1, 128), "float32"),
        "c": ((1, 128), "float32"),
        "features": ((20,), "float32"),
        "events": ((1,), "int64"),
    }
)
T0 = 1_700_000_000_123_456_789  # ns: beyond 2^53, so a double could not tell T0 from T0 - 1
CUSTOMERS = 5  # in the streams of the crash tests: event p belongs to customer p % CUSTOMERS
CURSOR = "worker-0"
POLLS = 600  # x 0.05 s: how long a test waits for a background writer's progress at most


def filled(value: int) -> dict[str, np.ndarray]:
    """A state whose every element is ``value`` (the state after ``value`` steps of +1)."""
    return {spec.name: np.full(spec.shape, value, spec.dtype) for spec in LAYOUT.fields}


def stepped(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next state: every element plus one (so a lost or repeated step shows)."""
    return {name: array + np.ones(1, array.dtype) for name, array in arrays.items()}


def update(
    customer_id: str, seq: int, timestamp_ns: int = T0, value: int | None = None
) -> StateUpdate:
    return StateUpdate(customer_id, seq, timestamp_ns, filled(seq if value is None else value))


@pytest.fixture
def store(store_url: str) -> Iterator[StateStore]:
    """An empty store of each backend with the layout declared for version 1."""
    with open_store(store_url) as opened:
        opened.declare(MODEL, 1, LAYOUT)
        yield opened


def test_states_round_trip_exactly(store: StateStore) -> None:
    rng = np.random.default_rng(0)
    arrays = {spec.name: rng.normal(size=spec.shape).astype(spec.dtype) for spec in LAYOUT.fields}
    arrays["h"][0, :4] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny / 2, -0.0, 1e-45]
    arrays["events"][0] = np.iinfo(np.int64).min
    odd_id = "zoë:{1}*"  # key separators, a hash tag and a glob character
    updates = [StateUpdate("c1", 1, T0, arrays), update(odd_id, 1)]
    result = store.apply(MODEL, 1, updates, StreamPosition(CURSOR, "17-3"))
    assert result.applied == (0, 1) and result.rejected == ()
    assert store.customer_ids(MODEL, 1) == sorted(store.customer_keys.keys(["c1", odd_id]))
    assert store.get(MODEL, 1, [odd_id]).require(odd_id).arrays["h"][0, 0] == 1

    lookup = store.get(MODEL, 1, ["c1", "nobody", "c1"])
    assert lookup.unknown == ("nobody",)
    state = lookup.require("c1")
    assert (state.seq, state.timestamp_ns) == (1, T0)
    for spec in LAYOUT.fields:
        got = state.arrays[spec.name]
        assert got.dtype == spec.dtype and got.shape == spec.shape
        assert got.tobytes() == arrays[spec.name].tobytes()
    state.arrays["h"] += 1  # callers get their own arrays
    assert store.cursor(MODEL, 1, CURSOR) == "17-3"
    assert store.cursor(MODEL, 1, "worker-1") is None
    with pytest.raises(UnknownCustomerError, match="unknown customer 'nobody'.*'twin' version 1"):
        lookup.require("nobody")


def test_state_bytes_per_customer() -> None:
    assert LAYOUT.nbytes == (2 * 128 + 20) * 4 + 8


def test_versions_never_mix(store: StateStore) -> None:
    store.declare(MODEL, 2, LAYOUT)
    store.apply(MODEL, 1, [update("c1", 1), update("c2", 1)], StreamPosition(CURSOR, "9"))

    assert store.get(MODEL, 2, ["c1"]).unknown == ("c1",)
    assert store.cursor(MODEL, 2, CURSOR) is None
    assert store.apply(MODEL, 2, [update("c1", 1, value=50)]).applied == (0,)
    assert store.get(MODEL, 1, ["c1"]).require("c1").arrays["h"][0, 0] == 1
    assert store.get(MODEL, 2, ["c1"]).require("c1").arrays["h"][0, 0] == 50
    assert store.versions(MODEL) == [1, 2]
    assert store.customer_ids(MODEL, 1) == sorted(store.customer_keys.keys(["c1", "c2"]))

    assert store.delete_version(MODEL, 1) == 2
    assert store.versions(MODEL) == [2]
    assert store.customer_ids(MODEL, 1) == []
    with pytest.raises(FintwinInputError, match=r"'twin' version 1 has no twin states.*\[2\]"):
        store.get(MODEL, 1, ["c1"])
    assert store.get(MODEL, 2, ["c1"]).require("c1").seq == 1


def test_a_version_keeps_its_layout(store: StateStore) -> None:
    store.declare(MODEL, 1, LAYOUT)
    other = StateLayout.of({"h": ((2, 64), "float32")})
    with pytest.raises(FintwinInputError, match="version 1 holds twin states of another layout"):
        store.declare(MODEL, 1, other)
    store.declare(MODEL, 2, other)
    assert store.layout(MODEL, 2) == other


def test_rejected_updates_change_nothing_and_the_rest_applies(store: StateStore) -> None:
    store.apply(MODEL, 1, [update(f"c{i}", 1, T0) for i in range(1, 5)])
    batch = [
        update("c1", 2, T0 + 10),
        update("c2", 1, T0, value=99),  # replayed
        update("c3", 2, T0 - 1, value=99),  # older than c3's last event, by 1 ns
        update("c4", 3, T0 + 10, value=99),  # event 2 is missing
        update("c5", 1, T0 - 10**12),  # a new customer
        update("c1", 3, T0 + 10),  # a second event of c1 in the batch, at the same time
    ]
    result = store.apply(MODEL, 1, batch, StreamPosition(CURSOR, "6"))

    assert result.applied == (0, 4, 5)
    assert [(r.index, r.customer_id, r.reason) for r in result.rejected] == [
        (1, "c2", RejectReason.DUPLICATE),
        (2, "c3", RejectReason.OUT_OF_ORDER),
        (3, "c4", RejectReason.SEQUENCE_GAP),
    ]
    messages = [r.message for r in result.rejected]
    assert "customer 'c2': event 1 is applied already (stored: 1 events)" in messages[0]
    assert (
        "2023-11-14T22:13:20.123456788 is older than the last applied event at 2023-11-14T22:13:20.123456789"
        in messages[1]
    )
    assert "stored: 1 events, next is 2" in messages[2]
    states = store.get(MODEL, 1, ["c1", "c2", "c3", "c4", "c5"]).states
    assert {
        cid: (s.seq, s.timestamp_ns, int(s.arrays["c"][0, 0])) for cid, s in states.items()
    } == {
        "c1": (3, T0 + 10, 3),
        "c2": (1, T0, 1),
        "c3": (1, T0, 1),
        "c4": (1, T0, 1),
        "c5": (1, T0 - 10**12, 1),
    }
    assert store.cursor(MODEL, 1, CURSOR) == "6"


@pytest.mark.parametrize("stored_ns", [T0, 2**32, -(2**32)])
def test_order_is_exact_to_the_nanosecond(store: StateStore, stored_ns: int) -> None:
    store.apply(MODEL, 1, [update("c1", 1, stored_ns)])
    assert (
        store.apply(MODEL, 1, [update("c1", 2, stored_ns - 1)]).rejected[0].reason
        == RejectReason.OUT_OF_ORDER
    )
    assert store.apply(MODEL, 1, [update("c1", 2, stored_ns)]).applied == (0,)


def test_two_writers_on_one_state_only_the_first_wins(store_url: str, store: StateStore) -> None:
    store.apply(MODEL, 1, [update("c1", 1)])
    with open_store(store_url) as other:
        base = other.get(MODEL, 1, ["c1"]).require("c1")
        assert store.apply(MODEL, 1, [update("c1", base.seq + 1, value=7)]).applied == (0,)
        late = other.apply(MODEL, 1, [update("c1", base.seq + 1, value=8)])
    assert late.rejected[0].reason == RejectReason.DUPLICATE
    assert store.get(MODEL, 1, ["c1"]).require("c1").arrays["h"][0, 0] == 7


def step_until_applied(store: StateStore, customers: list[str], steps: int) -> None:
    """Step each customer ``steps`` times from its stored state (compare-and-set: a rejected
    update is read again and retried)."""
    remaining = dict.fromkeys(customers, steps)
    attempts = 0
    while remaining and attempts < 100 * steps:
        attempts += 1
        states = store.get(MODEL, 1, list(remaining)).states
        updates = [
            StateUpdate(cid, s.seq + 1, s.timestamp_ns + 1, stepped(s.arrays))
            if (s := states.get(cid))
            else update(cid, 1)
            for cid in remaining
        ]
        result = store.apply(MODEL, 1, updates)
        assert {r.reason for r in result.rejected} <= {RejectReason.DUPLICATE}
        for index in result.applied:
            cid = updates[index].customer_id
            remaining[cid] -= 1
            if not remaining[cid]:
                del remaining[cid]
    assert not remaining, f"not applied after {attempts} attempts: {remaining}"


def test_concurrent_writers_lose_no_update(store_url: str, store: StateStore) -> None:
    writers, steps, customers = 16, 10, ["c1", "c2", "c3"]
    barrier = threading.Barrier(writers)
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with open_store(store_url) as own:
                barrier.wait()
                step_until_applied(own, customers, steps)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for cid, state in store.get(MODEL, 1, customers).states.items():
        assert state.seq == writers * steps, cid
        for name, array in state.arrays.items():
            assert (array == writers * steps).all(), (cid, name)


def consume(url: str, stop_at: int | None = None, batch: int = 8) -> None:
    """A stream consumer: event p (1, 2, ...) steps customer p % CUSTOMERS at time T0 + p; it
    resumes after its stored cursor and stores each micro-batch with its position."""
    with open_store(url) as store:
        position = int(store.cursor(MODEL, 1, CURSOR) or 0)
        while stop_at is None or position < stop_at:
            events = range(
                position + 1,
                position + batch + 1 if stop_at is None else min(position + batch, stop_at) + 1,
            )
            latest = dict(store.get(MODEL, 1, {f"c{p % CUSTOMERS}" for p in events}).states)
            updates = []
            for p in events:
                cid, before = f"c{p % CUSTOMERS}", latest.get(f"c{p % CUSTOMERS}")
                arrays = stepped(before.arrays) if before else filled(1)
                updates.append(StateUpdate(cid, before.seq + 1 if before else 1, T0 + p, arrays))
                latest[cid] = updates[-1]
            result = store.apply(MODEL, 1, updates, StreamPosition(CURSOR, str(events[-1])))
            assert not result.rejected, result.rejected
            position = events[-1]


def assert_consistent(url: str) -> int:
    """Every customer's state holds exactly the events up to the stored cursor; returns it."""
    with open_store(url) as store:
        position = int(store.cursor(MODEL, 1, CURSOR) or 0)
        counts = Counter(f"c{p % CUSTOMERS}" for p in range(1, position + 1))
        states = store.get(MODEL, 1, [f"c{k}" for k in range(CUSTOMERS)]).states
    assert {cid: s.seq for cid, s in states.items()} == dict(counts)
    for cid, state in states.items():
        assert all((array == counts[cid]).all() for array in state.arrays.values()), cid
        last = max(p for p in range(1, position + 1) if f"c{p % CUSTOMERS}" == cid)
        assert state.timestamp_ns == T0 + last
    return position


def start_consumer(url: str) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=consume, args=(url,), daemon=True)
    process.start()
    return process


def wait_for_cursor(url: str, process: multiprocessing.Process, beyond: int) -> None:
    with open_store(url) as store:
        for _ in range(POLLS):
            assert process.is_alive(), f"the consumer exited with {process.exitcode}"
            if int(store.cursor(MODEL, 1, CURSOR) or 0) > beyond:
                return
            time.sleep(0.05)
    raise AssertionError(f"the consumer did not pass event {beyond} in {POLLS} polls")


def kill(process: multiprocessing.Process) -> None:
    process.kill()  # SIGKILL
    process.join()


def test_a_killed_consumer_resumes_exactly_once(store_url: str, store: StateStore) -> None:
    position = 0
    for _ in range(5):  # each kill lands in an apply() or between two, by chance
        process = start_consumer(store_url)
        try:
            wait_for_cursor(store_url, process, position + 100)
        finally:
            kill(process)
        position = assert_consistent(store_url)
    consume(store_url, stop_at=position + 100)
    assert assert_consistent(store_url) == position + 100


def test_a_killed_redis_server_keeps_states_and_cursor_together(start_redis: Callable) -> None:
    server = start_redis(appendonly=True)
    with open_store(server.url) as store:
        store.declare(MODEL, 1, LAYOUT)
    process = start_consumer(server.url)
    try:
        wait_for_cursor(server.url, process, 300)
        server.kill()
    finally:
        kill(process)
    server.start()  # replays the append-only file
    position = assert_consistent(server.url)
    assert position > 300
    consume(server.url, stop_at=position + 50)
    assert assert_consistent(server.url) == position + 50


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "twins.db"
    with SQLiteStateStore(path) as store:
        store.declare(MODEL, 1, LAYOUT)
        store.apply(MODEL, 1, [update("c1", 1)])
        files = [path, path.with_name("twins.db-wal"), path.with_name("twins.db-shm")]
        assert [stat.S_IMODE(os.stat(file).st_mode) for file in files] == [0o600] * 3


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "twins.db"
    path.write_text("customer_id,timestamp\n" * 200)
    with pytest.raises(FintwinInputError, match=f"state store {path}: not a usable SQLite file"):
        SQLiteStateStore(path)


def test_unknown_store_url() -> None:
    with pytest.raises(FintwinInputError, match="expected sqlite:///PATH or redis://HOST:PORT"):
        open_store("postgres://db/twins")


def bad(**changes) -> StateUpdate:
    arrays = filled(1) | changes.pop("arrays", {})
    fields = {"customer_id": "c9", "seq": 1, "timestamp_ns": T0, "arrays": arrays} | changes
    return StateUpdate(**fields)


@pytest.mark.parametrize(
    ("bad_update", "message"),
    [
        (
            bad(arrays={"h": np.zeros((128,), np.float32)}),
            r"customer 'c9', field 'h': expected float32 array of shape \(1, 128\), got float32 array of shape \(128,\)",
        ),
        (
            bad(arrays={"events": np.zeros(1, np.int32)}),
            r"customer 'c9', field 'events': expected int64 array of shape \(1,\), got int32 array",
        ),
        (
            bad(arrays={"features": [0.0] * 20}),
            r"field 'features': expected float32 array of shape \(20,\), got list",
        ),
        (
            bad(arrays={"c": np.full((1, 128), np.nan, np.float32)}),
            "customer 'c9', field 'c': holds NaN or inf",
        ),
        (bad(arrays={"cell": np.zeros(1, np.float32)}), "customer 'c9': unexpected field 'cell'"),
        (
            StateUpdate("c9", 1, T0, {"h": np.zeros((1, 128), np.float32)}),
            r"customer 'c9', field 'c': missing; expected float32 array of shape \(1, 128\)",
        ),
        (bad(seq=0), r"update of customer 'c9': sequence number 0 must be an integer in \[1, "),
        (
            bad(timestamp_ns="2024-01-01"),
            "update of customer 'c9': timestamp_ns '2024-01-01' must be an integer",
        ),
        (bad(customer_id=""), "customer id '': expected a non-empty string"),
    ],
)
def test_a_bad_update_writes_nothing(
    store: StateStore, bad_update: StateUpdate, message: str
) -> None:
    with pytest.raises(FintwinInputError, match=message):
        store.apply(MODEL, 1, [update("c1", 1), bad_update], StreamPosition(CURSOR, "2"))
    assert store.customer_ids(MODEL, 1) == []
    assert store.cursor(MODEL, 1, CURSOR) is None


def test_bad_names_and_versions(store: StateStore) -> None:
    with pytest.raises(
        FintwinInputError, match="'twin' version 3 has no twin states in this store"
    ):
        store.apply(MODEL, 3, [update("c1", 1)])
    with pytest.raises(FintwinInputError, match="model name 'twin:x': expected letters"):
        store.get("twin:x", 1, ["c1"])
    with pytest.raises(FintwinInputError, match="version 0 must be an integer >= 1"):
        store.cursor(MODEL, 0, CURSOR)
    with pytest.raises(FintwinInputError, match="stream cursor name '': expected a non-empty"):
        store.apply(MODEL, 1, [], StreamPosition("", "1"))
    with pytest.raises(FintwinInputError, match="state field 'h': dtype float64 is not supported"):
        StateLayout.of({"h": ((4,), "float64")})


def test_a_version_deleted_under_a_writer_is_not_written(store_url: str, store: StateStore) -> None:
    store.apply(MODEL, 1, [update("c1", 1)])
    with open_store(store_url) as admin:
        assert admin.delete_version(MODEL, 1) == 1
    with pytest.raises(FintwinInputError, match="'twin' version 1 has no twin states"):
        store.apply(MODEL, 1, [update("c2", 1)])
    assert store.customer_ids(MODEL, 1) == []
