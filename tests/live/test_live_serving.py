"""The live model end to end: `fintwin export` writes it next to the batch model, the embedded
Triton serves it, raw events go in over HTTP/REST, plain HTTP/JSON and gRPC, and:

- the answer after a customer's events equals `fintwin predict --repo` on that history;
- bad events are refused naming the row and field, and change no state;
- 16 concurrent clients sending events of the same customers lose no update (SQLite and a
  real Redis server): the final states equal sequential application in the applied order;
- `fintwin live run` killed with SIGKILL mid-stream and started again applies every event
  exactly once; `fintwin live bootstrap` equals stepping; `fintwin live get` shows a twin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fintwin.cli import main
from fintwin.errors import FintwinInputError
from fintwin.live.events import read_events
from fintwin.live.store import open_store
from fintwin.live.triton_model import STATE_STORE_ENV, LiveModel, default_store_url
from fintwin.live.twins import LiveTwins
from fintwin.serving.client import TwinClient, model_batch
from fintwin.serving.server import EmbeddedTriton
from tests.conftest import make_events

pytestmark = pytest.mark.slow  # one export (batch + step graph) and two servers: about 2 min

MODEL, LIVE = "twin", "twin_live"
TOLERANCE = 1e-4  # scaled, as the export's parity check: |a - b| / max(1, |b|)
STATE_TOLERANCE = 1e-5  # states stepped in other batch compositions
POLLS = 1200  # x 0.05 s: the most a test waits for a process's output
SILENCE_FREE = ("next_event_probs", "next_time_mean", "next_time_quantiles", "dormant_prob",
                "next_amount_mean", "churn_prob")
CLIENTS = {"grpc": grpcclient, "http": httpclient}


@pytest.fixture(scope="module")
def live_repo(tmp_path_factory, tiny_checkpoint) -> Path:
    repo = tmp_path_factory.mktemp("live") / "repo"
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo), "--name", MODEL]) == 0
    return repo


@pytest.fixture(scope="module")
def server(live_repo) -> Iterator[EmbeddedTriton]:
    """The embedded server on the exported repository, its live model on the default store."""
    assert STATE_STORE_ENV not in os.environ
    with EmbeddedTriton(live_repo, startup_timeout_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def redis_server_url(redis_server) -> str:
    """Database 1 of the shared redis-server (other tests empty database 0), emptied."""
    url = f"redis://127.0.0.1:{redis_server.port}/1"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture(scope="module")
def redis_served(live_repo, redis_server_url) -> Iterator[EmbeddedTriton]:
    """A second server whose live model keeps its states in Redis."""
    os.environ[STATE_STORE_ENV] = redis_server_url
    try:
        running = EmbeddedTriton(live_repo, startup_timeout_s=120)
        running.start()
    finally:
        del os.environ[STATE_STORE_ENV]
    yield running
    running.stop()


def live_twins(repo: Path, url: str) -> LiveTwins:
    return LiveTwins(repo / LIVE / "1", open_store(url), LIVE, 1)


def event_rows(events: pd.DataFrame) -> list[dict]:
    return [
        {"customer_id": row.customer_id, "timestamp": row.timestamp.isoformat(),
         "event_type": row.event_type, "amount": float(row.amount)}
        for row in events.itertuples()
    ]


def infer(client, rows: list[dict], cursors: list[str] | None = None, drop: str = ""):
    """One request of raw events; returns the result (raises InferenceServerException)."""
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    columns = {name: [row[name] for row in rows]
               for name in ("customer_id", "timestamp", "event_type", "amount")}
    if cursors is not None:
        columns["cursor"] = cursors
    inputs = []
    for name, values in columns.items():
        if name == drop:
            continue
        array = (np.array(values, np.float32) if name == "amount"
                 else np.array([str(v).encode() for v in values], dtype=object)).reshape(-1, 1)
        tensor = module.InferInput(name, list(array.shape), "FP32" if name == "amount" else "BYTES")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(LIVE, inputs)


def connect(server: EmbeddedTriton, protocol: str):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return CLIENTS[protocol].InferenceServerClient(url)


def assert_same_states(got, want) -> None:
    """Same stored fields, up to float32 rounding of other batch compositions."""
    assert got.arrays.keys() == want.arrays.keys()
    for name, value in want.arrays.items():
        np.testing.assert_allclose(got.arrays[name], value, rtol=STATE_TOLERANCE,
                                   atol=STATE_TOLERANCE, err_msg=name)


def scaled_difference(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_live_answers_equal_batch_predict_over_grpc_and_http(server, live_repo, tmp_path,
                                                            protocol, capsys):
    """Twelve customers' 160 events in requests of 16 rows (several customers and several
    events of a customer per request); each customer's last answer equals the batch model's
    outputs on its whole history (`fintwin predict --repo`; the horizon outputs right after
    the last event, as the live answer gives them)."""
    events = make_events(n_customers=12, seed=5)
    events["customer_id"] = protocol + "-" + events["customer_id"]
    events = events.sort_values(["customer_id", "timestamp"], ignore_index=True)
    csv = tmp_path / "history.csv"
    events.to_csv(csv, index=False)
    client = connect(server, protocol)
    rows, last = event_rows(events), {}
    for start in range(0, len(rows), 16):
        result = infer(client, rows[start : start + 16])
        assert result.as_numpy("status")[:, 0].tolist() == [b"applied"] * len(rows[start : start + 16])
        for i, row in enumerate(rows[start : start + 16]):
            last[row["customer_id"]] = {name: result.as_numpy(name)[i] for name in
                                        (*SILENCE_FREE, "horizon_count", "horizon_spend", "seq")}
    client.close()

    batch = TwinClient(repo=live_repo, model=MODEL)
    sequences = batch.featurise(csv)
    arrays = {k: v.numpy() for k, v in sequences.batch(np.arange(len(sequences)), False).items()}
    arrays["days_since_last_event"] = np.zeros(len(sequences), np.float32)
    expected = batch.transport.infer(model_batch(arrays, batch.inputs, int(arrays["length"].max())))
    batch.close()
    ids = sequences.customer_ids.tolist()
    assert sorted(last) == ids
    assert [int(last[c]["seq"][0]) for c in ids] == events.groupby("customer_id").size().tolist()
    for name, want in expected.items():
        got = np.stack([last[c][name].reshape(want.shape[1:]) for c in ids])
        assert scaled_difference(got, want) <= TOLERANCE, name

    out = tmp_path / "predict.csv"
    assert main(["predict", "--repo", str(live_repo), "--model", MODEL, "--events", str(csv),
                 "--out", str(out)]) == 0
    predicted = pd.read_csv(out).set_index("customer_id").loc[ids]
    for column, name in (("churn_prob", "churn_prob"), ("next_time_mean_days", "next_time_mean"),
                         ("dormant_prob", "dormant_prob"), ("next_amount_mean", "next_amount_mean")):
        got = np.array([last[c][name][0] for c in ids])
        assert scaled_difference(got, predicted[column].to_numpy()) <= TOLERANCE, column
    top1 = np.array([last[c]["next_event_probs"][1:].max() for c in ids])
    assert scaled_difference(top1, predicted["top1_prob"].to_numpy()) <= TOLERANCE

    capsys.readouterr()
    assert main(["live", "get", ids[0], "--repo", str(live_repo), "--model", MODEL]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["seq"] == int(last[ids[0]]["seq"][0]) and shown["model"] == LIVE
    assert shown["last_event_time"] == str(np.datetime64(events[events.customer_id == ids[0]]
                                                         .timestamp.max().value, "ns"))
    assert shown["predictions"]["churn_prob"] == pytest.approx(float(last[ids[0]]["churn_prob"][0]))
    assert sum(shown["predictions"]["next_event_probs"].values()) == pytest.approx(1.0, abs=1e-5)


def test_plain_http_json_needs_no_client_library(server):
    """What serve/README.md shows with curl."""
    body = {"inputs": [
        {"name": "customer_id", "shape": [1, 1], "datatype": "BYTES", "data": ["json-c1"]},
        {"name": "timestamp", "shape": [1, 1], "datatype": "BYTES", "data": ["2024-07-01T12:30:00Z"]},
        {"name": "event_type", "shape": [1, 1], "datatype": "BYTES", "data": ["card"]},
        {"name": "amount", "shape": [1, 1], "datatype": "FP32", "data": [42.5]},
    ]}
    answer = post(server, body)
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    assert outputs["status"] == ["applied"] and outputs["seq"] == [1]
    assert len(outputs["next_event_probs"]) == 5 and 0 < outputs["churn_prob"][0] < 1

    body["inputs"][1]["data"] = ["next tuesday"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(server, body)
    assert refused.value.code == 400
    assert "column 'timestamp': unparseable timestamp 'next tuesday'" in refused.value.read().decode()


def post(server: EmbeddedTriton, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{LIVE}/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


GOOD = {"customer_id": "bad-c1", "timestamp": "2024-03-01T09:00:00", "event_type": "card",
        "amount": 12.0}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    ("bad", "drop", "words"),
    [
        ({"timestamp": "31st of March"}, "",
         "request, column 'timestamp': unparseable timestamp '31st of March'"),
        ({"amount": float("nan")}, "", "request, column 'amount': NaN or infinite value"),
        ({"event_type": " "}, "", "request, column 'event_type': missing value"),
        ({}, "event_type", "missing required input(s) ['event_type']"),
    ],
)
def test_bad_events_are_refused_naming_row_and_field_and_change_no_state(
    server, live_repo, protocol, bad, drop, words
):
    client = connect(server, protocol)
    with pytest.raises(InferenceServerException) as refused:
        infer(client, [GOOD, GOOD | {"customer_id": "bad-c2"} | bad], drop=drop)
    client.close()
    assert refused.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert words in refused.value.message()
    if not drop:
        assert refused.value.message().endswith("(first offending rows, 0-based: 1)")
    twins = live_twins(live_repo, default_store_url(live_repo))
    assert twins.load(np.array(["bad-c1", "bad-c2"])).seq.tolist() == [0, 0]  # nothing applied


def test_requests_batched_together_are_answered_each_as_alone(live_repo, tmp_path):
    """Triton hands the model several requests at once: a bad one is refused alone, and
    requests of two consumers store each consumer's position."""
    twins = live_twins(live_repo, f"sqlite:///{tmp_path / 'batched.db'}")
    model = LiveModel(twins)

    def request(customer: str, amount: float, cursor: str) -> dict[str, np.ndarray]:
        row = GOOD | {"customer_id": customer, "amount": amount}
        return {name: np.array([[value if name == "amount" else str(value).encode()]],
                               dtype=np.float32 if name == "amount" else object)
                for name, value in (row | {"cursor": cursor}).items()}

    results = model.answer([request("m1", 1.0, "a:1"), request("m2", float("nan"), "a:2"),
                            request("m3", 3.0, "b:7")])
    assert isinstance(results[1], FintwinInputError)
    assert str(results[1]).startswith("request, column 'amount': NaN or infinite value")
    assert [r["status"][0, 0] for r in (results[0], results[2])] == [b"applied", b"applied"]
    assert [r["stored_cursor"][0, 0] for r in (results[0], results[2])] == [b"1", b"7"]
    assert twins.store.cursor(LIVE, 1, "a") == "1" and twins.store.cursor(LIVE, 1, "b") == "7"
    assert twins.load(np.array(["m1", "m2", "m3"])).seq.tolist() == [1, 0, 1]
    replay = model.answer([request("m1", 1.0, "a:1")])[0]
    assert replay["status"][0, 0].decode().startswith("duplicate: consumer 'a' has applied its "
                                                      "stream up to position 1")
    assert replay["seq"][0, 0] == 1 and replay["stored_cursor"][0, 0] == b"1"


def test_unknown_types_are_oov_and_old_events_are_refused(server, live_repo, capsys):
    client = connect(server, "grpc")
    first = infer(client, [GOOD | {"customer_id": "oov-c1", "event_type": "crypto"}])
    assert first.as_numpy("status")[0, 0] == b"applied" and first.as_numpy("seq")[0, 0] == 1
    twins = live_twins(live_repo, default_store_url(live_repo))
    before = twins.load(np.array(["oov-c1"]))
    late = infer(client, [GOOD | {"customer_id": "oov-c1", "timestamp": "2024-02-29T09:00:00"}])
    client.close()
    status = late.as_numpy("status")[0, 0].decode()
    assert status.startswith("out-of-order: customer 'oov-c1': event at 2024-02-29T09:00:00")
    assert status.endswith("is older than its last applied event at "
                           "2024-03-01T09:00:00.000000000; refused, the twin is unchanged")
    assert late.as_numpy("seq")[0, 0] == 1  # the twin's, unchanged
    np.testing.assert_array_equal(late.as_numpy("churn_prob")[0], first.as_numpy("churn_prob")[0])
    after = twins.load(np.array(["oov-c1"]))
    for name, value in before.arrays.items():
        np.testing.assert_array_equal(after.arrays[name], value, err_msg=name)

    assert main(["live", "get", "nobody", "--repo", str(live_repo), "--model", MODEL]) == 2
    assert "unknown customer 'nobody': no twin state for model 'twin_live' version 1" in \
        capsys.readouterr().err


def test_no_raw_customer_id_in_the_store_the_log_or_the_metrics(server, live_repo, capsys):
    """Customers are stored, logged and counted under their keyed hash only; ``live get``
    finds a twin by the raw id all the same."""
    secret_ids = ["raw-id-alice-7731", "raw-id-bob-7732"]
    client = connect(server, "grpc")
    answer = infer(client, [GOOD | {"customer_id": cid} for cid in secret_ids])
    client.close()
    assert answer.as_numpy("status")[:, 0].tolist() == [b"applied", b"applied"]
    database = Path(default_store_url(live_repo).removeprefix("sqlite:///"))
    files = [*database.parent.glob(database.name + "*"), server.log_path]
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        metrics = response.read()
    for where, blob in [(str(path), path.read_bytes()) for path in files] + [("metrics", metrics)]:
        for cid in secret_ids:
            assert cid.encode() not in blob, f"{where} holds the raw customer id {cid!r}"
    assert main(["live", "get", secret_ids[0], "--repo", str(live_repo), "--model", MODEL]) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == 1


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_16_concurrent_clients_lose_no_update(request, live_repo, tmp_path, store):
    """16 clients send, in 8 bursts, one request each holding an event of customer a and one
    of customer b (a burst's events share a timestamp: any order is in time order); every
    event is applied exactly once, and the final states equal applying the events one by one
    in the order the twins applied them."""
    served = request.getfixturevalue("server" if store == "sqlite" else "redis_served")
    url = (default_store_url(live_repo) if store == "sqlite"
           else request.getfixturevalue("redis_server_url"))
    customers = [f"{store}-a", f"{store}-b"]
    applied: dict[str, dict[int, dict]] = {c: {} for c in customers}
    barrier, lock, failures = threading.Barrier(16), threading.Lock(), []

    def client(j: int) -> None:
        connection = grpcclient.InferenceServerClient(served.grpc_url)
        try:
            for burst in range(8):
                barrier.wait(timeout=60)
                rows = [{"customer_id": c, "timestamp": f"2024-05-{burst + 1:02d}T08:00:00",
                         "event_type": ("card", "salary", "transfer")[(j + burst + k) % 3],
                         "amount": float(1 + j + 16 * burst + 1000 * k)}
                        for k, c in enumerate(customers)]
                result = infer(connection, rows)
                with lock:
                    for row, status, seq in zip(rows, result.as_numpy("status")[:, 0],
                                                result.as_numpy("seq")[:, 0], strict=True):
                        assert status == b"applied", status
                        applied[row["customer_id"]][int(seq)] = row
        except Exception as exc:  # reported by the main thread
            failures.append(exc)
            barrier.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(j,)) for j in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures and not any(thread.is_alive() for thread in threads)
    assert {c: sorted(seqs) for c, seqs in applied.items()} == {c: list(range(1, 129))
                                                               for c in customers}

    served_twins = live_twins(live_repo, url)
    sequential = live_twins(live_repo, f"sqlite:///{tmp_path / 'sequential.db'}")
    for customer in customers:
        for seq in range(1, 129):
            answers = sequential.apply(events_of([applied[customer][seq]], sequential))
            assert answers.status.tolist() == ["applied"]
    got = served_twins.load(np.array(customers))
    want = sequential.load(np.array(customers))
    assert got.seq.tolist() == want.seq.tolist() == [128, 128]
    assert_same_states(got, want)


def events_of(rows: list[dict], twins: LiveTwins):
    columns = {name: np.array([row[name] for row in rows],
                              dtype=np.float32 if name == "amount" else object)
               for name in rows[0]}
    return read_events(columns, twins.spec)


def test_bootstrap_equals_stepping(live_repo, tmp_path, events_csv, capsys):
    """`fintwin live bootstrap` of the 60-customer history file (batched) stores the states,
    event counts and last times that stepping every event, 16 per request, stores."""
    bootstrapped = f"sqlite:///{tmp_path / 'bootstrapped.db'}"
    arguments = ["live", "bootstrap", "--repo", str(live_repo), "--model", MODEL, "--events",
                 events_csv, "--store", bootstrapped]
    assert main(arguments) == 0
    assert capsys.readouterr().out.startswith(
        "bootstrapped 60 customers (767 events) of twin_live version 1 in ")
    assert main(arguments) == 0
    assert "0 customers (0 events)" in capsys.readouterr().out  # a second run keeps them

    stepping = live_twins(live_repo, f"sqlite:///{tmp_path / 'stepped.db'}")
    history = pd.read_csv(events_csv, parse_dates=["timestamp"]).sort_values(
        ["timestamp", "customer_id"], kind="stable")
    rows = event_rows(history)  # in time order: a stream
    for start in range(0, len(rows), 16):
        answers = stepping.apply(events_of(rows[start : start + 16], stepping))
        assert set(answers.status) == {"applied"}
    customers = np.array(sorted(history["customer_id"].unique()), dtype=object)
    got = live_twins(live_repo, bootstrapped).load(customers)
    want = stepping.load(customers)
    counts = history.groupby("customer_id").size().loc[customers].tolist()
    assert got.seq.tolist() == want.seq.tolist() == counts
    np.testing.assert_array_equal(got.last_ns, want.last_ns)
    assert_same_states(got, want)


def write_stream(path: Path, events: pd.DataFrame) -> None:
    """Events as a JSON-lines stream in time order."""
    ordered = events.sort_values(["timestamp", "customer_id"], kind="stable")
    path.write_text("".join(json.dumps(row) + "\n" for row in event_rows(ordered)))


def test_a_killed_run_resumes_and_applies_every_event_exactly_once(server, live_repo, tmp_path):
    """`fintwin live run` (2 events per request) gets SIGKILL after 40 answers, and is
    started again: every event is applied once (sequence numbers = event counts), no answer
    is written twice, and the states equal those of the history bootstrapped in one go."""
    events = make_events(n_customers=16, seed=9)
    events["customer_id"] = "kill-" + events["customer_id"]
    stream, out = tmp_path / "events.jsonl", tmp_path / "answers.jsonl"
    write_stream(stream, events)
    command = [sys.executable, "-m", "fintwin.cli", "live", "run", "--url", server.grpc_url,
               "--model", MODEL, "--input", str(stream), "--batch", "2", "--out", str(out)]
    with open(tmp_path / "run.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(POLLS):
                if out.exists() and len(out.read_text().splitlines()) >= 40:
                    break
                if process.poll() is not None:
                    break
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "run.log").read_text()
    answered_before = len(out.read_text().splitlines())
    assert 40 <= answered_before < len(events)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "applied before" in rerun.stderr and "events/s" in rerun.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    positions = [answer["position"] for answer in answers]
    assert len(positions) == len(set(positions)) >= len(events) - 2  # a batch's lines may be lost
    assert {answer["status"] for answer in answers} == {"applied"}

    customers = np.array(sorted(events["customer_id"].unique()), dtype=object)
    got = live_twins(live_repo, default_store_url(live_repo)).load(customers)
    reference = live_twins(live_repo, f"sqlite:///{tmp_path / 'reference.db'}")
    reference.bootstrap(events)
    want = reference.load(customers)
    assert got.seq.tolist() == events.groupby("customer_id").size().loc[customers].tolist()
    assert_same_states(got, want)


def test_redis_stream_consumer_group_answers_and_acknowledges(redis_served, live_repo,
                                                              redis_server_url, tmp_path):
    """Events added to a Redis stream are read in a consumer group, answered into an output
    stream and acknowledged; a second run of the consumer finds nothing left to do."""
    events = make_events(n_customers=6, seed=11)
    events["customer_id"] = "stream-" + events["customer_id"]
    ordered = events.sort_values(["timestamp", "customer_id"], kind="stable")
    with redis.Redis.from_url(redis_server_url) as client:
        for row in event_rows(ordered):
            client.xadd("events", {k: str(v) for k, v in row.items()})
        arguments = ["live", "run", "--url", redis_served.grpc_url, "--model", MODEL,
                     "--redis-stream", "events", "--redis-url", redis_server_url, "--group",
                     "twins", "--consumer", "worker-1", "--redis-out", "answers",
                     "--exit-when-idle"]
        assert main(arguments) == 0
        answers = [json.loads(fields[b"answer"]) for _, fields in client.xrange("answers")]
        assert len(answers) == len(events) and {a["status"] for a in answers} == {"applied"}
        assert client.xpending("events", "twins")["pending"] == 0
        assert main(arguments) == 0
        assert client.xlen("answers") == len(events)  # nothing answered twice
    customers = np.array(sorted(events["customer_id"].unique()), dtype=object)
    got = live_twins(live_repo, redis_server_url).load(customers)
    assert got.seq.tolist() == events.groupby("customer_id").size().loc[customers].tolist()
