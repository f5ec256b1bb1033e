"""Serving latency and throughput of the twins: torch eager, onnxruntime, embedded Triton.

One LSTM twin (hidden 128, 1 layer) and one transformer twin (hidden 128, 2 layers, 4 heads)
with random weights are exported with ``export_onnx`` into a temporary Triton model
repository: each encoder as written by ``write_model_version`` (dynamic batching on, 100 us
queue delay, the ``fintwin export`` default), plus ``lstm_nobatch``, the same LSTM whose
``config.pbtxt`` has its ``dynamic_batching`` block removed (Triton then runs every request on
its own). The embedded tritonserver (python backend running onnxruntime with one intra-op
thread) is started on free loopback ports and stopped at the end.

Paths, one table row each:

- torch eager: ``ExportableTwin`` in ``torch.inference_mode``, ``torch.set_num_threads(2)``,
  and again with one thread: on a busy 2-core machine two OpenMP threads wait on each other
  at every operator, so the 1-thread row is the like-for-like baseline;
- onnxruntime in process: ``InProcessRunner``, i.e. the served model's onnxruntime options (one
  intra-op thread, as in the server) and input validation;
- Triton HTTP and Triton gRPC: ``TritonTransport`` against the embedded server;
- Triton gRPC, mutual TLS + API key: the same against a second embedded server on the same
  repository whose gRPC endpoint speaks mutual TLS (a throwaway CA, P-256 keys) and requires
  an API key (batch-1 latency only). Its overhead over plain gRPC, the TLS target, is also
  measured in pairs: the same request sent over both back to back (in alternating order), the
  median of the differences, which load that varies over seconds leaves unbiased.

The onnxruntime targets are checked against the faster torch row of each cell.

Latency: batch-1 requests (one customer, full sequence) sent one after the other, to the
models with dynamic batching on; the paths take turns in blocks (see ``latency_rounds``);
p50 / p99 in ms.
Throughput: 1, 4 and 16 client threads, each sending ``--requests`` LSTM requests of 1, 2, 4
or 8 customers (in turn; sequences of up to 64 events) as fast as answers come back. gRPC
threads share one client; every HTTP thread has its own (tritonclient's HTTP client is not
thread safe). Client and server share the machine's cores.

Run:  python bench/serving.py [--requests 300] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from machine_info import machine as cpu_and_lock
from rich import box
from rich.console import Console
from rich.table import Table

from fintwin.data.contract import CONTRACT_KEY, exported_contract, random_inputs
from fintwin.data.features import FEATURISER_KEY, FeaturiserSpec, Vocab
from fintwin.data.simulator import EVENT_TYPES
from fintwin.export.graph import ExportableTwin
from fintwin.export.onnx import export_onnx
from fintwin.export.triton_repo import (
    format_model_config,
    read_model_config,
    write_model_version,
)
from fintwin.models.checkpoint import TrainedTwin
from fintwin.models.module import QUANTILE_LEVELS, TwinModule
from fintwin.serving.certificates import write_development_pki
from fintwin.serving.client import InProcessRunner, TritonTransport
from fintwin.serving.security import AccessControl, ClientCredentials, ClientTls, ServerTls
from fintwin.serving.server import EmbeddedTriton

Infer = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

ENCODERS = {
    "lstm": {"name": "lstm", "hidden_size": 128, "num_layers": 1},
    "transformer": {"name": "transformer", "hidden_size": 128, "num_layers": 2, "num_heads": 4},
}
SCALING = {
    "amount_mean": 3.5,
    "amount_std": 1.2,
    "delta_t_mean": 1.6,
    "delta_t_std": 1.0,
    "numeric_mean": [],
    "numeric_std": [],
}
HORIZON_DAYS = 90.0
MAX_LEN = 256

LATENCY_LENGTHS = (64, 256)
BATCH_SHAPE = (64, 64)  # (customers, sequence length) of the large-batch comparison
THROUGHPUT_ENCODER = "lstm"
THROUGHPUT_LENGTH = 64
THROUGHPUT_BATCHES = (1, 2, 4, 8)  # customers per request, sent in turn
CLIENTS = (1, 4, 16)
NO_BATCHING_SUFFIX = "_nobatch"
TORCH_THREADS = (2, 1)
SERVER_THREADS = 1  # onnxruntime intra-op threads, in the served model and in process
REQUEST_POOL = 32  # distinct random requests per cell, cycled
WARMUP = 10
ROUNDS = 5
SETTLE_S = 0.05

TORCH_PATHS = {f"torch eager, {n} thread{'s' * (n > 1)}": n for n in TORCH_THREADS}
ORT, HTTP, GRPC = "onnxruntime in process", "Triton HTTP", "Triton gRPC"
GRPC_TLS = "Triton gRPC, mutual TLS + API key"
PATHS = (*TORCH_PATHS, ORT, HTTP, GRPC, GRPC_TLS)

TARGET_ORT_B1_SPEEDUP = 1.5
TARGET_ORT_B64_SPEEDUP = 1.0
TARGET_GRPC_P50_OVERHEAD_MS = 1.5
TARGET_GRPC_P99_OVERHEAD_MS = 3.0
TARGET_BATCHING_GAIN = 3.0
TARGET_TLS_P50_OVERHEAD_MS = 0.5


@dataclass
class Latency:
    """Per-request latencies of one path in one cell, seconds."""

    seconds: list[float]

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.seconds, q)) * 1e3

    @property
    def p50(self) -> float:
        return self.percentile_ms(50)

    @property
    def p99(self) -> float:
        return self.percentile_ms(99)


@dataclass
class Throughput:
    requests_per_s: float
    customers_per_s: float
    requests_per_execution: float | None = None  # Triton: requests per model execution


# ------------------------------------------------------------------ models and repository
def random_twin(encoder: str, seed: int) -> TrainedTwin:
    """A randomly initialised twin with the data settings a trained one carries."""
    torch.manual_seed(seed)
    vocab = Vocab.fit(np.array(EVENT_TYPES))
    model = TwinModule(
        encoder=ENCODERS[encoder],
        vocab_size=vocab.size,
        scaling=SCALING,
        horizon_days=HORIZON_DAYS,
    ).eval()
    spec = FeaturiserSpec(vocab, max_len=MAX_LEN, horizon_days=HORIZON_DAYS)
    split = {"source": "synthetic", "cutoff": "2024-06-29", "observation_end": "2024-06-30",
             "simulator": None}
    return TrainedTwin(model, spec, split)


def build_repository(repo: Path) -> dict[str, ExportableTwin]:
    """Export every encoder into ``repo``; add the LSTM again without dynamic batching."""
    wrappers = {}
    for seed, encoder in enumerate(ENCODERS):
        twin = random_twin(encoder, seed)
        onnx_path = repo.parent / f"{encoder}.onnx"
        export_onnx(twin, onnx_path)
        metadata = {FEATURISER_KEY: twin.spec.to_dict(), "quantiles": list(QUANTILE_LEVELS),
                    "encoder": encoder, CONTRACT_KEY: exported_contract(twin.model.contract_sizes())}
        write_model_version(repo, encoder, onnx_path, metadata)
        if encoder == THROUGHPUT_ENCODER:
            name = encoder + NO_BATCHING_SUFFIX
            write_model_version(repo, name, onnx_path, metadata)
            config = read_model_config(repo / name)
            config.ClearField("dynamic_batching")
            (repo / name / "config.pbtxt").write_text(format_model_config(config))
        wrappers[encoder] = ExportableTwin(twin.model)
    return wrappers


def torch_infer(wrapper: ExportableTwin, threads: int) -> Infer:
    """Eager PyTorch on ``threads`` threads, numpy in and out (what a torch server would do)."""

    def infer(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            outputs = wrapper(*(torch.from_numpy(inputs[name]) for name in wrapper.input_names))
        return {name: out.numpy() for name, out in zip(wrapper.output_names, outputs, strict=True)}

    return infer


def request_pool(wrapper: ExportableTwin, batches: tuple[int, ...], seq_len: int,
                 seed: int) -> list[dict[str, np.ndarray]]:
    """``REQUEST_POOL`` random valid requests, their batch sizes cycling through ``batches``."""
    rng = np.random.default_rng(seed)
    return [random_inputs(rng, wrapper.sizes, batches[i % len(batches)], seq_len)
            for i in range(REQUEST_POOL)]


# -------------------------------------------------------------------------- measurement
def latency_rounds(paths: Mapping[str, Infer], requests: list[dict[str, np.ndarray]],
                   n: int) -> dict[str, Latency]:
    """``n`` sequential requests per path, in ``ROUNDS`` blocks; latencies per path.

    The paths take turns block by block (order reversed every other round), so load from other
    processes falls on all of them alike, and each block starts after a short pause, so threads
    the previous path left spinning do not slow the next one down.
    """
    for infer in paths.values():
        for request in requests[:WARMUP]:
            infer(request)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for round_index in range(ROUNDS):
        block = n // ROUNDS + (round_index < n % ROUNDS)
        order = list(paths) if round_index % 2 == 0 else list(reversed(paths))
        for name in order:
            time.sleep(SETTLE_S)
            for i in range(block):
                request = requests[i % len(requests)]
                start = time.perf_counter()
                paths[name](request)
                seconds[name].append(time.perf_counter() - start)
    return {name: Latency(values) for name, values in seconds.items()}


def paired_overhead_ms(base: Infer, other: Infer, requests: list[dict[str, np.ndarray]],
                       n: int) -> float:
    """Median, over ``n`` requests each sent to both paths back to back (in alternating
    order), of ``other``'s latency minus ``base``'s, in ms."""
    differences = []
    for i in range(n):
        request = requests[i % len(requests)]
        seconds = {}
        for infer in (base, other) if i % 2 == 0 else (other, base):
            start = time.perf_counter()
            infer(request)
            seconds[infer] = time.perf_counter() - start
        differences.append(seconds[other] - seconds[base])
    return float(np.median(differences)) * 1e3


def throughput(clients: list[Infer], requests: list[dict[str, np.ndarray]],
               per_client: int) -> Throughput:
    """Closed loop: every client sends ``per_client`` requests back to back, all at once."""
    start_line = threading.Barrier(len(clients) + 1, timeout=120)

    def run(index: int, infer: Infer) -> int:
        try:
            infer(requests[index % len(requests)])  # connect and warm up before the clock starts
        finally:
            start_line.wait()  # a failed client still lets the others start; its error follows
        customers = 0
        for k in range(per_client):
            request = requests[(index + k) % len(requests)]
            infer(request)
            customers += len(request["length"])
        return customers

    time.sleep(SETTLE_S)
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(run, i, infer) for i, infer in enumerate(clients)]
        start_line.wait()
        start = time.perf_counter()
        customers = sum(future.result() for future in futures)
        elapsed = time.perf_counter() - start
    return Throughput(len(clients) * per_client / elapsed, customers / elapsed)


def triton_clients(server: EmbeddedTriton, protocol: str, model: str,
                   count: int) -> list[TritonTransport]:
    """gRPC: one client shared by every thread; HTTP: one client per thread."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    if protocol == "grpc":
        return [TritonTransport(url, "grpc", model)] * count
    return [TritonTransport(url, "http", model) for _ in range(count)]


def served_counts(server: EmbeddedTriton, model: str) -> tuple[float, float]:
    """(successful requests, model executions) of ``model`` so far, from Triton's metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in ("nv_inference_request_success", "nv_inference_exec_count") and (
            f'model="{model}"' in rest
        ):
            values[name] = float(line.rsplit(" ", 1)[1])
    return values["nv_inference_request_success"], values["nv_inference_exec_count"]


def measure_throughput(server: EmbeddedTriton, runners: Mapping[str, Infer],
                       requests: list[dict[str, np.ndarray]],
                       per_client: int) -> dict[tuple[str, bool, int], Throughput]:
    """(path, dynamic batching, clients) -> throughput; in-process paths count as unbatched."""
    results = {}
    for count in CLIENTS:
        for path, infer in runners.items():
            results[(path, False, count)] = throughput([infer] * count, requests, per_client)
        for path, protocol in ((HTTP, "http"), (GRPC, "grpc")):
            for batching in (False, True):
                model = THROUGHPUT_ENCODER + ("" if batching else NO_BATCHING_SUFFIX)
                clients = triton_clients(server, protocol, model, count)
                served_before, executions_before = served_counts(server, model)
                try:
                    rate = throughput([client.infer for client in clients], requests, per_client)
                finally:
                    for client in set(clients):
                        client.close()
                served, executions = served_counts(server, model)
                rate.requests_per_execution = (
                    (served - served_before) / (executions - executions_before))
                results[(path, batching, count)] = rate
    return results


# ------------------------------------------------------------------------------- report
def ms(latency: Latency) -> str:
    return f"{latency.p50:.2f} / {latency.p99:.2f}"


def results_table(latency: dict[tuple[str, int], dict[str, Latency]],
                  batch64: dict[str, dict[str, Latency]],
                  rates: dict[tuple[str, bool, int], Throughput], requests: int) -> Table:
    batch, seq_len = BATCH_SHAPE
    table = Table(
        title=f"Serving, CPU fp32, hidden 128: batch-1 latency p50 / p99 ms ({requests} requests "
        f"per cell); batch {batch} x {seq_len} p50 ms; {THROUGHPUT_ENCODER} throughput "
        f"requests/s (customers/s), requests of {'/'.join(map(str, THROUGHPUT_BATCHES))} "
        f"customers x {THROUGHPUT_LENGTH} events; cl = clients, DB = dynamic batching",
        box=box.MARKDOWN,
    )
    table.add_column("path", no_wrap=True)
    for encoder, seq_len in latency:
        table.add_column(f"{encoder} T{seq_len}", justify="right")
    for encoder in ENCODERS:
        table.add_column(f"B{batch} {encoder}", justify="right")
    for batching in (False, True):
        for count in CLIENTS:
            table.add_column(f"{count} cl, DB {'on' if batching else 'off'}", justify="right")
    for path in PATHS:
        row = [path, *(ms(cell[path]) for cell in latency.values())]
        row += [f"{batch64[e][path].p50:.1f}" if path in batch64[e] else "-" for e in ENCODERS]
        for batching in (False, True):
            for count in CLIENTS:
                rate = rates.get((path, batching, count))
                row.append(f"{rate.requests_per_s:,.0f} ({rate.customers_per_s:,.0f})"
                           if rate else "-")
        table.add_row(*row)
    return table


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def speedup_line(what: str, cells: dict[str, dict[str, Latency]], target: float) -> str:
    """onnxruntime p50 speedup over each torch row per cell; the target is on the faster row."""
    parts, worst = [], []
    for label, paths in cells.items():
        ratios = [paths[torch_path].p50 / paths[ORT].p50 for torch_path in TORCH_PATHS]
        worst.append(min(ratios))
        parts.append(f"{label} {'/'.join(f'{r:.2f}x' for r in ratios)}")
    threads = "/".join(str(n) for n in TORCH_THREADS)
    return (f"onnxruntime vs torch eager ({threads} threads), {what} p50 speedup "
            f"(target >= {target}x vs the faster): {', '.join(parts)}  "
            f"{verdict(min(worst) >= target)}")


def target_lines(latency: dict[tuple[str, int], dict[str, Latency]],
                 batch64: dict[str, dict[str, Latency]],
                 rates: dict[tuple[str, bool, int], Throughput],
                 tls_paired: dict[tuple[str, int], float]) -> list[str]:
    lines = [
        speedup_line("batch 1", {f"{e} T{t}": cell for (e, t), cell in latency.items()},
                     TARGET_ORT_B1_SPEEDUP),
        speedup_line(f"batch {BATCH_SHAPE[0]}", batch64, TARGET_ORT_B64_SPEEDUP),
    ]
    for stat, target in (("p50", TARGET_GRPC_P50_OVERHEAD_MS), ("p99", TARGET_GRPC_P99_OVERHEAD_MS)):
        overheads = {cell: getattr(paths[GRPC], stat) - getattr(paths[ORT], stat)
                     for cell, paths in latency.items()}
        lines.append(
            f"Triton gRPC - in-process onnxruntime, batch 1 {stat} (target <= {target} ms): "
            + ", ".join(f"{e} T{t} {o:+.2f} ms" for (e, t), o in overheads.items())
            + f"  {verdict(max(overheads.values()) <= target)}"
        )
    lines.append(
        f"{GRPC_TLS} - plain gRPC, batch 1, p50 / p99 of the table, and median of paired "
        f"differences (target <= {TARGET_TLS_P50_OVERHEAD_MS} ms): " + ", ".join(
            f"{e} T{t} {paths[GRPC_TLS].p50 - paths[GRPC].p50:+.2f} / "
            f"{paths[GRPC_TLS].p99 - paths[GRPC].p99:+.2f}, paired {tls_paired[(e, t)]:+.2f} ms"
            for (e, t), paths in latency.items())
        + f"  {verdict(max(tls_paired.values()) <= TARGET_TLS_P50_OVERHEAD_MS)}"
    )
    clients = CLIENTS[-1]
    for path in (GRPC, HTTP):
        on, off = rates[(path, True, clients)], rates[(path, False, clients)]
        gain = on.requests_per_s / off.requests_per_s
        check = f"  {verdict(gain >= TARGET_BATCHING_GAIN)}" if path == GRPC else ""
        target = f" (target >= {TARGET_BATCHING_GAIN}x)" if path == GRPC else ""
        lines.append(f"{path} dynamic batching on / off at {clients} clients{target}: "
                     f"{gain:.2f}x (requests per model execution: on "
                     f"{on.requests_per_execution:.1f}, off {off.requests_per_execution:.1f})"
                     f"{check}")
    return lines


def machine() -> str:
    cpu = cpu_and_lock()
    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, onnxruntime {ort.__version__}"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300,
                        help="requests per latency cell and per client in a throughput cell")
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 requests per cell")
    args = parser.parse_args()
    if args.quick:
        args.requests = 30
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=250)
    console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {machine()}, "
                  f"load average at start {load_average()}")
    with tempfile.TemporaryDirectory(prefix="fintwin-bench-serving-") as scratch:
        repo = Path(scratch) / "models"
        wrappers = build_repository(repo)
        in_process = {
            encoder: {
                **{path: torch_infer(wrapper, n) for path, n in TORCH_PATHS.items()},
                ORT: InProcessRunner(repo, encoder, intra_op_threads=SERVER_THREADS).infer,
            }
            for encoder, wrapper in wrappers.items()
        }
        pki = write_development_pki(Path(scratch) / "pki")
        api_key = secrets.token_urlsafe(32)
        secure_server = EmbeddedTriton(
            repo, intra_op_threads=SERVER_THREADS, access=AccessControl(api_key=api_key),
            tls=ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca))
        credentials = ClientCredentials(ClientTls(pki.ca, pki.client_cert, pki.client_key), api_key)
        with EmbeddedTriton(repo, intra_op_threads=SERVER_THREADS) as server, secure_server:
            latency, batch64, tls_paired = {}, {}, {}
            for encoder, wrapper in wrappers.items():
                grpc = TritonTransport(server.grpc_url, "grpc", encoder)
                http = TritonTransport(server.http_url, "http", encoder)
                grpc_tls = TritonTransport(secure_server.grpc_url, "grpc", encoder,
                                           credentials=credentials)
                paths = {**in_process[encoder], HTTP: http.infer, GRPC: grpc.infer,
                         GRPC_TLS: grpc_tls.infer}
                for seq_len in LATENCY_LENGTHS:
                    requests = request_pool(wrapper, (1,), seq_len, seed=seq_len)
                    latency[(encoder, seq_len)] = latency_rounds(paths, requests, args.requests)
                    tls_paired[(encoder, seq_len)] = paired_overhead_ms(
                        grpc.infer, grpc_tls.infer, requests, args.requests)
                for transport in (grpc, http, grpc_tls):
                    transport.close()
                requests = request_pool(wrapper, BATCH_SHAPE[:1], BATCH_SHAPE[1], seed=1)
                batch64[encoder] = latency_rounds(
                    in_process[encoder], requests, max(WARMUP, args.requests // 10))
            requests = request_pool(
                wrappers[THROUGHPUT_ENCODER], THROUGHPUT_BATCHES, THROUGHPUT_LENGTH, seed=2)
            rates = measure_throughput(server, in_process[THROUGHPUT_ENCODER], requests,
                                       args.requests)
    console.print(results_table(latency, batch64, rates, args.requests))
    for line in target_lines(latency, batch64, rates, tls_paired):
        console.print(line)
    console.print(f"load average at end {load_average()} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
