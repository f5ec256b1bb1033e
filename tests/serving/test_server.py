"""Embedded Triton end to end: runtime repository, round trips, endpoints, batching, shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import np_to_triton_dtype

from fintwin.export.integrity import write_manifest
from fintwin.export.triton_repo import (
    TRITON_VERSION,
    ModelRepositoryError,
    read_model_config,
    write_model_version,
)
from fintwin.serving.client import InProcessRunner, TritonTransport
from fintwin.serving.server import (
    EmbeddedTriton,
    ServerError,
    build_runtime_repository,
    free_ports,
)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def _port_is_free(host: str, port: int) -> bool:
    """Nothing listens on the port (connections in TIME_WAIT do not count, as for any server)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def test_runtime_repository_mirrors_export_and_links_the_same_onnx(model_repo, standin, tmp_path):
    names = build_runtime_repository(model_repo, tmp_path / "runtime", intra_op_threads=2)

    assert names == [standin.model_name]
    production = read_model_config(model_repo / standin.model_name)
    runtime = read_model_config(tmp_path / "runtime" / standin.model_name)
    assert runtime.backend == "python" and runtime.platform == ""
    for runtime_input, production_input in zip(runtime.input, production.input, strict=True):
        assert runtime_input.allow_ragged_batch == (-1 in production_input.dims)
        runtime_input.allow_ragged_batch = False
    assert list(runtime.input) == list(production.input)
    assert list(runtime.output) == list(production.output)
    assert runtime.max_batch_size == production.max_batch_size
    assert runtime.dynamic_batching == production.dynamic_batching
    assert [(g.kind, g.count) for g in runtime.instance_group] == [
        (runtime.instance_group[0].KIND_CPU, 1)
    ]
    assert runtime.parameters["intra_op_threads"].string_value == "2"
    version = tmp_path / "runtime" / standin.model_name / "1"
    assert (version / "model.onnx").is_symlink()
    assert os.path.samefile(
        version / "model.onnx", model_repo / standin.model_name / "1" / "model.onnx"
    )
    assert os.path.samefile(
        version / "fintwin.json", model_repo / standin.model_name / "1" / "fintwin.json"
    )
    assert "class TritonPythonModel" in (version / "model.py").read_text()


def test_unusable_repository_is_refused_before_starting(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRepositoryError, match="holds no model"):
        EmbeddedTriton(tmp_path / "empty").start()
    with pytest.raises(ModelRepositoryError, match="does not exist"):
        EmbeddedTriton(tmp_path / "missing").start()


def test_numpy_2_is_refused_before_starting(model_repo, monkeypatch):
    monkeypatch.setattr(np, "__version__", "2.1.0")
    server = EmbeddedTriton(model_repo)
    with pytest.raises(ServerError, match=r"numpy 2\.1\.0 .* needs numpy<2"):
        server.start()
    assert server.process is None


def test_round_trip_equals_onnxruntime_in_process(transport, reference, standin, rng):
    inputs = standin.random_inputs(rng, batch=5, seq=9, lengths=[9, 4, 1, 7, 2])
    expected = reference.infer(inputs)
    # rows differ, so a server returning the first row (or first element) everywhere fails
    assert np.ptp(expected["churn_prob"]) > 1e-3
    assert np.ptp(expected["next_event_probs"][0]) > 1e-3

    served = transport.infer(inputs)

    standin.assert_outputs_equal(served, expected)
    assert served["churn_prob"].shape == (5,)
    assert served["next_event_probs"].shape == (5, standin.vocab_size)
    np.testing.assert_allclose(served["next_event_probs"].sum(axis=1), 1.0, atol=1e-5)


def test_batch_of_one_and_long_sequence(transport, reference, standin, rng):
    for batch, seq in [(1, 1), (1, 200), (64, 3)]:  # 64 = max_batch_size
        inputs = standin.random_inputs(rng, batch=batch, seq=seq)
        standin.assert_outputs_equal(transport.infer(inputs), reference.infer(inputs))


def test_health_and_server_metadata(triton_server, standin):
    base = f"http://{triton_server.http_url}"
    assert _get(f"{base}/v2/health/live")[0] == 200
    assert _get(f"{base}/v2/health/ready")[0] == 200
    assert _get(f"{base}/v2/models/{standin.model_name}/ready")[0] == 200
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_server_ready()
        assert client.get_server_metadata(as_json=True)["version"] == TRITON_VERSION
    finally:
        client.close()


def test_served_config_has_dynamic_batching_and_exported_io(triton_server, model_repo, standin):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        served = client.get_model_config(standin.model_name)
    finally:
        client.close()
    production = read_model_config(model_repo / standin.model_name)

    assert served["backend"] == "python"
    assert served["max_batch_size"] == production.max_batch_size == 64
    assert served["dynamic_batching"]["preferred_batch_size"] == [8, 32]
    assert served["dynamic_batching"]["max_queue_delay_microseconds"] == 200
    assert [t["name"] for t in served["input"]] == [t.name for t in production.input]
    length = next(t for t in served["input"] if t["name"] == "length")
    assert length["dims"] == [1] and length["reshape"] == {"shape": []}


def test_metrics_endpoint_counts_successful_requests(triton_server, transport, standin, rng):
    transport.infer(standin.random_inputs(rng, batch=2, seq=4))

    status, text = _get(triton_server.metrics_url)

    assert status == 200
    assert "# TYPE nv_inference_request_success counter" in text
    match = re.search(
        rf'nv_inference_request_success\{{model="{standin.model_name}",version="1"\}} (\d+)', text
    )
    assert match and int(match.group(1)) >= 1


def test_concurrent_clients_all_get_their_own_correct_results(triton_server, reference, standin):
    """Three threads share one gRPC transport, a fourth has its own HTTP one (HTTP is per thread)."""
    rng = np.random.default_rng(7)
    jobs = [
        standin.random_inputs(rng, batch=int(rng.integers(1, 6)), seq=int(rng.integers(1, 20)))
        for _ in range(64)
    ]
    expected = [reference.infer(inputs) for inputs in jobs]
    failures: list[str] = []
    shared_grpc = TritonTransport(triton_server.grpc_url, "grpc", standin.model_name)
    own_http = TritonTransport(triton_server.http_url, "http", standin.model_name)

    def worker(thread_index: int, client: TritonTransport) -> None:
        for job in range(thread_index, len(jobs), 4):
            try:
                standin.assert_outputs_equal(client.infer(jobs[job]), expected[job])
            except AssertionError as exc:
                failures.append(f"job {job} ({client.protocol}): {exc}")

    clients = [shared_grpc, shared_grpc, shared_grpc, own_http]
    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(clients)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        shared_grpc.close()
        own_http.close()
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


def test_dynamic_batcher_merges_requests_of_different_lengths(standin_onnx, standin, tmp_path):
    """Four concurrent requests (T = 3, 5, 8, 13) reach execute() together: padded, run, split."""
    write_model_version(
        tmp_path,
        standin.model_name,
        standin_onnx,
        standin.metadata,
        max_batch_size=8,
        preferred_batch_sizes=[4],
        max_queue_delay_us=500_000,
    )
    reference = InProcessRunner(tmp_path, standin.model_name, intra_op_threads=1)
    rng = np.random.default_rng(3)
    jobs = [standin.random_inputs(rng, batch=1, seq=seq) for seq in (3, 5, 8, 13)]
    with EmbeddedTriton(tmp_path) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            results: list = [None] * len(jobs)
            done = threading.Semaphore(0)

            def callback(index: int, result, error) -> None:
                results[index] = error or result
                done.release()

            for index, job in enumerate(jobs):
                client.async_infer(
                    standin.model_name,
                    _grpc_inputs(job),
                    callback=lambda result, error, index=index: callback(index, result, error),
                )
            for _ in jobs:
                assert done.acquire(timeout=30)
            stats = settled_statistics(
                client, standin.model_name, len(jobs), headers=server.admin_headers("grpc")
            )
        finally:
            client.close()

    for job, result in zip(jobs, results, strict=True):
        expected = reference.infer(job)
        got = {name: result.as_numpy(name).reshape(expected[name].shape) for name in expected}
        standin.assert_outputs_equal(got, expected)
    assert int(stats["inference_count"]) == 4
    assert int(stats["execution_count"]) == 1


def settled_statistics(
    client, model: str, inferences: int, headers: dict[str, str], attempts: int = 50
) -> dict:
    """The model's statistics once Triton has recorded ``inferences`` requests (it records them
    just after sending the responses), or the last ones read after ``attempts`` polls; the
    statistics API is restricted: ``headers`` carry the server's admin key."""
    for _ in range(attempts):
        stats = client.get_inference_statistics(model, headers=headers, as_json=True)[
            "model_stats"
        ][0]
        if int(stats.get("inference_count", 0)) >= inferences:
            break
        time.sleep(0.1)
    return stats


def _grpc_inputs(inputs: dict[str, np.ndarray]) -> list:
    tensors = []
    for name, array in inputs.items():
        array = array.reshape(-1, 1) if array.ndim == 1 else array
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def test_stop_leaves_no_process_port_or_file(model_repo, standin):
    shm_before = set(os.listdir("/dev/shm"))
    server = EmbeddedTriton(model_repo)
    server.start()
    try:
        group = server.process.pid
        workdir = server.workdir
        ports = dict(server.ports)
        members = standin.processes_in_group(group)
        assert group in members and len(members) >= 2  # tritonserver + one python stub
        assert any(
            Path(f"/proc/{pid}/exe").resolve().name == "triton_python_backend_stub"
            for pid in members
        )
    finally:
        server.stop()

    assert standin.processes_in_group(group) == []
    assert not workdir.exists()
    assert all(_port_is_free("127.0.0.1", port) for port in ports.values())
    assert set(os.listdir("/dev/shm")) <= shm_before
    assert not server.running


def test_model_that_fails_to_load_reports_the_server_log(model_repo, standin, tmp_path):
    broken = tmp_path / "repo"
    (broken / standin.model_name / "1").mkdir(parents=True)
    (broken / standin.model_name / "config.pbtxt").write_text(
        (model_repo / standin.model_name / "config.pbtxt").read_text()
    )
    (broken / standin.model_name / "1" / "model.onnx").write_bytes(b"not an onnx file")
    write_manifest(broken / standin.model_name / "1")  # intact as recorded, unloadable
    server = EmbeddedTriton(broken, startup_timeout_s=60)

    with pytest.raises(ServerError) as error:
        server.start()

    message = str(error.value)
    assert "exited with code" in message and "its log" in message
    assert f"failed to load '{standin.model_name}'" in message
    assert "INVALID_PROTOBUF" in message and "model.onnx" in message
    assert server.process is None and server.workdir is None


def test_serve_runs_until_sigint_then_shuts_down_cleanly(model_repo, standin):
    http_port, grpc_port, metrics_port = free_ports("127.0.0.1", 3)
    code = (
        "import logging, sys; from fintwin.serving.server import serve; "
        "logging.basicConfig(level=logging.INFO); "
        f"sys.exit(serve({str(model_repo)!r}, '127.0.0.1', "
        f"{http_port}, {grpc_port}, {metrics_port}))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = TritonTransport(f"127.0.0.1:{grpc_port}", "grpc", standin.model_name)
        deadline = time.monotonic() + 60
        while not client.ready() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert client.ready()
        client.close()
        server_pids = [
            pid
            for pid in standin.children_of(process.pid)
            if Path(f"/proc/{pid}/exe").resolve().name == "tritonserver"
        ]
        assert len(server_pids) == 1

        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 0, output.decode()
    assert standin.processes_in_group(server_pids[0]) == []
    assert _port_is_free("127.0.0.1", grpc_port)
    assert b"tritonserver ready" in output
