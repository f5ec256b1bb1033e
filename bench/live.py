"""Live twins: raw events through the embedded Triton live model, with the SQLite and the Redis
state store; bootstrap speed; stored state per customer.

One LSTM twin with random weights (hidden 128, 1 layer, type recency and history summary, as
configs/model/lstm.yaml) is written as a live model (its step graph exported and parity
checked, ``fintwin.live.repository``) into a temporary repository, and the embedded
tritonserver serves it twice, one after the other: its states in a SQLite file (the embedded
default: WAL, one fsync per transaction) and in a ``redis-server`` started on a free loopback
port (no persistence; appendfsync always would add an fsync per batch, as SQLite does).

Throughput: 1 and 16 gRPC client threads, each sending requests of 1 or 64 events as fast as
answers come back, for ``--seconds`` per cell; every client owns its customers (a stream
consumer's partition) and sends their events in time order. Latency: event in to predictions
out, i.e. the request's round trip, p50 / p99. Open loop: one event per request offered at
1,000 events/s (gRPC async, sent on schedule; latency counted from the scheduled time).
Client and server share the machine's cores.

Bootstrap: ``LiveTwins.bootstrap`` of a random history (20,000 customers, 1 to 40 events
each) into a SQLite store, in process (reading, featurising, stepping and storing).

State bytes per customer: the stored record (the step graph's state and the predictions after
the last event) of the LSTM above and of a transformer (hidden 128, 2 layers, 4 heads) with
a window of ``max_len`` = 256 events.

Run:  python bench/live.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import redis
import torch
import tritonclient.grpc as grpcclient
from machine_info import machine as cpu_and_lock

from fintwin.data.features import FEATURISER_KEY, FeaturiserSpec, Vocab
from fintwin.data.simulator import EVENT_TYPES
from fintwin.export.onnx import ParityReport
from fintwin.live.pseudonyms import KEY_ENV
from fintwin.live.repository import (
    export_step_graph,
    live_metadata,
    step_metadata,
    write_live_model,
)
from fintwin.live.step import StepModel
from fintwin.live.store import StateLayout, open_store
from fintwin.live.triton_model import STATE_STORE_ENV
from fintwin.live.twins import LiveTwins, live_model_name
from fintwin.models.checkpoint import TrainedTwin
from fintwin.models.module import QUANTILE_LEVELS, TwinModule
from fintwin.serving.server import EmbeddedTriton, free_ports

NAME = "twin"
ENCODERS = {
    "lstm": {"name": "lstm", "hidden_size": 128, "num_layers": 1, "type_recency": True,
             "history_summary": True},
    "transformer": {"name": "transformer", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                    "type_recency": True, "history_summary": True},
}
SCALING = {"amount_mean": 3.5, "amount_std": 1.2, "delta_t_mean": 1.6, "delta_t_std": 1.0,
           "numeric_mean": [], "numeric_std": []}
HORIZON_DAYS, MAX_LEN = 90.0, 256
CLIENTS, BATCHES = (1, 16), (1, 64)
CUSTOMERS_PER_CLIENT = 512
OFFERED_RATE, OFFERED_EVENTS = 1000, 3000
BOOTSTRAP_CUSTOMERS = 20_000
WARMUP_REQUESTS = 20


def random_twin(encoder: str, seed: int = 0) -> TrainedTwin:
    torch.manual_seed(seed)
    vocab = Vocab.fit(np.array(EVENT_TYPES))
    model = TwinModule(encoder=ENCODERS[encoder], vocab_size=vocab.size, scaling=SCALING,
                       horizon_days=HORIZON_DAYS).eval()
    spec = FeaturiserSpec(vocab, max_len=MAX_LEN, horizon_days=HORIZON_DAYS)
    return TrainedTwin(model, spec, {"source": "synthetic", "cutoff": "2024-06-29",
                                     "observation_end": "2024-06-30", "simulator": None})


def build_repository(repo: Path, scratch: Path) -> None:
    twin = random_twin("lstm")
    step_graph, _, step = export_step_graph(twin, scratch)
    metadata = {FEATURISER_KEY: twin.spec.to_dict(), "quantiles": list(QUANTILE_LEVELS),
                "encoder": "lstm"}
    write_live_model(repo, NAME, twin.spec, step_graph, live_metadata(metadata, step), scratch,
                     max_batch_size=256, max_queue_delay_us=100)


def state_bytes(encoder: str) -> int:
    step = StepModel(random_twin(encoder).model, MAX_LEN)
    return StateLayout.from_json(step_metadata(step, ParityReport())["layout"]).nbytes


# ------------------------------------------------------------------ clients
class EventSource:
    """Events of one client's own customers, in time order (a consumer's partition)."""

    def __init__(self, cell: str, client: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.customers = np.array(
            [f"{cell}-c{client}-{k}".encode() for k in range(CUSTOMERS_PER_CLIENT)], dtype=object
        )
        self.clock = pd.Timestamp("2024-01-01").value
        self.types = np.array([t.encode() for t in EVENT_TYPES], dtype=object)

    def request(self, events: int) -> list[grpcclient.InferInput]:
        self.clock += events * 60 * 10**9
        stamps = self.clock + np.arange(events) * 10**9
        columns = {
            "customer_id": self.rng.choice(self.customers, events),
            "timestamp": np.array([str(pd.Timestamp(s).isoformat()).encode() for s in stamps],
                                  dtype=object),
            "event_type": self.rng.choice(self.types, events),
            "amount": self.rng.lognormal(3, 1, events).astype(np.float32),
        }
        inputs = []
        for name, values in columns.items():
            array = values.reshape(-1, 1)
            tensor = grpcclient.InferInput(name, list(array.shape),
                                           "FP32" if array.dtype == np.float32 else "BYTES")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs


def closed_loop(url: str, model: str, clients: int, batch: int, seconds: float
                ) -> tuple[float, list[float]]:
    """Events per second and per-request latencies (s) of ``clients`` threads."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    events = [0] * clients
    barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def run(index: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        source = EventSource(f"closed{clients}x{batch}", index, seed=index + 1000 * batch)
        for _ in range(WARMUP_REQUESTS):
            client.infer(model, source.request(batch))
        barrier.wait()
        while time.monotonic() < deadline[0]:
            inputs = source.request(batch)
            started = time.perf_counter()
            result = client.infer(model, inputs)
            latencies[index].append(time.perf_counter() - started)
            statuses = result.as_numpy("status")[:, 0]
            assert (statuses == b"applied").all(), statuses[statuses != b"applied"][:1]
            events[index] += batch
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.monotonic() + 3600
    barrier.wait()
    started = time.monotonic()
    deadline[0] = started + seconds
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return sum(events) / elapsed, [s for per in latencies for s in per]


def open_loop(url: str, model: str, rate: float, count: int) -> tuple[float, list[float]]:
    """One event per request offered at ``rate`` per second: achieved rate, latencies (s)
    from each request's scheduled time to its answer."""
    client = grpcclient.InferenceServerClient(url)
    source = EventSource("open", 0, seed=99)
    requests = [source.request(1) for _ in range(count)]
    latencies: list[float] = []
    done = threading.Semaphore(0)

    def answered(scheduled: float):
        def callback(result, error) -> None:
            latencies.append(time.perf_counter() - scheduled)
            done.release()
        return callback

    for inputs in requests[:WARMUP_REQUESTS]:
        client.infer(model, inputs)
    start = time.perf_counter()
    for i, inputs in enumerate(requests):
        scheduled = start + i / rate
        pause = scheduled - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        client.async_infer(model, inputs, answered(scheduled))
    for _ in requests:
        done.acquire(timeout=60)
    elapsed = time.perf_counter() - start
    client.close()
    return count / elapsed, latencies


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_ports("127.0.0.1", 1)[0]
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def serving(repo: Path, store: str) -> Iterator[EmbeddedTriton]:
    os.environ[STATE_STORE_ENV] = store
    try:
        server = EmbeddedTriton(repo, startup_timeout_s=180)
        server.start()
    finally:
        del os.environ[STATE_STORE_ENV]
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------ bootstrap
def random_history(customers: int, seed: int = 0, prefix: str = "h") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 41, customers)
    owner = np.repeat(np.arange(customers), counts)
    start = pd.Timestamp("2023-01-01").value
    times = start + (rng.uniform(0, 365, len(owner)) * 86_400e9).astype(np.int64)
    return pd.DataFrame({
        "customer_id": np.char.add(prefix, owner.astype(str)),
        "timestamp": pd.to_datetime(times),
        "event_type": rng.choice(EVENT_TYPES, len(owner)),
        "amount": np.round(rng.lognormal(3, 1, len(owner)), 2),
    })


def bootstrap_rate(repo: Path, scratch: Path) -> float:
    history = random_history(BOOTSTRAP_CUSTOMERS)
    live = live_model_name(NAME)
    with open_store(f"sqlite:///{scratch / 'bootstrap.db'}") as store:
        twins = LiveTwins(repo / live / "1", store, live, 1, threads=0)
        twins.bootstrap(random_history(100, seed=1, prefix="warmup"))  # imports, first runs
        started = time.perf_counter()
        report = twins.bootstrap(history)
        elapsed = time.perf_counter() - started
    assert report.kept == 0 and report.customers == BOOTSTRAP_CUSTOMERS
    return report.events / elapsed


# ------------------------------------------------------------------ table
def ms(latencies: list[float]) -> str:
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    return f"{p50:.1f} / {p99:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput cell")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault(KEY_ENV, secrets.token_hex(32))  # Redis needs the shared id secret
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fintwin-bench-live-") as tmp:
        scratch = Path(tmp)
        repo = scratch / "models"
        build_repository(repo, scratch)
        live = live_model_name(NAME)
        with redis_server(scratch) as redis_url:
            for store, url in (("SQLite", f"sqlite:///{scratch / 'states.db'}"),
                               ("Redis", redis_url)):
                with serving(repo, url) as server:
                    for clients in CLIENTS:
                        for batch in BATCHES:
                            rate, latencies = closed_loop(server.grpc_url, live, clients, batch,
                                                          args.seconds)
                            rows.append((store, f"{clients} client{'s' * (clients > 1)}, "
                                         f"{batch} event{'s' * (batch > 1)} per request",
                                         f"{rate:,.0f}", ms(latencies)))
                    rate, latencies = open_loop(server.grpc_url, live, OFFERED_RATE,
                                                OFFERED_EVENTS)
                    rows.append((store, f"open loop: {OFFERED_RATE:,} events/s offered, 1 per "
                                 "request", f"{rate:,.0f}", ms(latencies)))
        bootstrap = bootstrap_rate(repo, scratch)
    sizes = {encoder: state_bytes(encoder) for encoder in ENCODERS}

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({cpu_and_lock()}), "
          f"host {socket.gethostname()}, {time.time() - started:.0f} s\n")
    print("| store | load (gRPC, embedded Triton, LSTM h128) | events/s | latency p50 / p99 ms |")
    print("|---|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"| SQLite | bootstrap, in process ({BOOTSTRAP_CUSTOMERS:,} customers) | "
          f"{bootstrap:,.0f} | |")
    for encoder, size in sizes.items():
        shape = ENCODERS[encoder]
        print(f"| | stored state per customer, {encoder} h{shape['hidden_size']} "
              f"{shape['num_layers']} layer{'s' * (shape['num_layers'] > 1)}"
              f"{', window ' + str(MAX_LEN) if encoder == 'transformer' else ''} | "
              f"{size:,} bytes | |")


if __name__ == "__main__":
    main()
