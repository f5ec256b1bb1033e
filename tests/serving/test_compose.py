"""serve/docker-compose.yml agrees with the repositories fintwin exports and the bundled Triton."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from fintwin.export.triton_repo import (
    TRITON_IMAGE,
    TRITON_VERSION,
    read_model_config,
    write_model_version,
)

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "serve" / "docker-compose.yml"


@pytest.fixture(scope="module")
def service() -> dict:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return compose["services"]["tritonserver"]


def _flags(service: dict) -> dict[str, str]:
    command = service["command"]
    assert command[0] == "tritonserver"
    return dict(flag.removeprefix("--").partition("=")[::2] for flag in command[1:])


def test_image_is_the_pinned_triton_release_matching_the_bundled_server(service):
    assert service["image"] == TRITON_IMAGE == "nvcr.io/nvidia/tritonserver:24.10-py3"
    year, month = map(int, re.fullmatch(r".*:(\d\d)\.(\d\d)-py3", service["image"]).groups())
    # Triton releases monthly: container 24.01 is 2.42.0, so 24.10 is 2.51.0, the version
    # bundled in nvidia-pytriton 0.7.0 (test_server checks the embedded server reports it)
    assert TRITON_VERSION == f"2.{42 + (year - 24) * 12 + (month - 1)}.0"


def test_repository_is_mounted_read_only_where_tritonserver_reads_it(service):
    flags = _flags(service)
    mounts = [v for v in service["volumes"] if v["target"] == flags["model-repository"]]
    assert flags["model-repository"] == "/models"
    assert len(mounts) == 1 and mounts[0]["read_only"] is True and mounts[0]["type"] == "bind"
    assert "model_repository" in mounts[0]["source"]


def test_ports_publish_http_grpc_and_metrics(service):
    flags = _flags(service)
    published = {
        int(p.split(":")[0]): int(p.split(":")[1])
        for p in (str(p).split()[0] for p in service["ports"])
    }
    assert published == {8000: 8000, 8001: 8001, 8002: 8002}
    assert (flags["http-port"], flags["grpc-port"], flags["metrics-port"]) == (
        "8000",
        "8001",
        "8002",
    )
    assert flags["allow-metrics"] == "true"


def test_server_flags_suit_versioned_exports(service):
    flags = _flags(service)
    assert flags["strict-readiness"] == "true"
    assert flags["model-control-mode"] == "poll" and int(flags["repository-poll-secs"]) > 0
    assert flags["disable-auto-complete-config"] == ""  # a bare switch
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])


def test_gpu_is_reserved(service):
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_gpu_export_is_what_the_container_loads(standin_onnx, standin, tmp_path):
    """The compose server runs the exported repository as is: onnxruntime backend, GPU instances."""
    write_model_version(tmp_path, standin.model_name, standin_onnx, {}, device="gpu", instances=2)

    config = read_model_config(tmp_path / standin.model_name)
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert config.default_model_filename in ("", "model.onnx")  # onnxruntime's default file name
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, 2)
    ]
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    assert (tmp_path / standin.model_name / "1" / "model.onnx").is_file()
