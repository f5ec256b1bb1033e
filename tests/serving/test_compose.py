"""serve/docker-compose.yml agrees with the repositories fintwin exports and the bundled Triton."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
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
from fintwin.serving.security import AccessControl

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


def test_ports_publish_only_tls_endpoints(service):
    """gRPC (TLS in tritonserver) and the proxy's HTTPS; plain HTTP and metrics stay inside."""
    flags = _flags(service)
    published = {
        int(p.rsplit(":", 2)[-2]): (p.rsplit(":", 2)[0] if p.count(":") == 2 else "", int(p.rsplit(":", 1)[1]))
        for p in (str(p).split()[0] for p in service["ports"])
    }
    # to the network: gRPC and the proxy's HTTPS; Prometheus (in this network namespace) to the
    # host's loopback only
    assert published == {8001: ("", 8001), 8443: ("", 8443), 9090: ("127.0.0.1", 9090)}
    assert (flags["http-port"], flags["grpc-port"], flags["metrics-port"]) == (
        "8000",
        "8001",
        "8002",
    )
    assert flags["http-address"] == flags["metrics-address"] == "127.0.0.1"
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


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a service's read-only bind mounts."""
    return {v["target"]: v["source"] for v in service["volumes"] if v.get("read_only")}


def test_grpc_speaks_mutual_tls_with_mounted_certificates(service):
    flags = _flags(service)
    assert flags["grpc-use-ssl"] == flags["grpc-use-ssl-mutual"] == "true"
    certs = _mounts(service)["/certs"]
    assert "FINTWIN_CERTS" in certs
    assert [flags[f"grpc-{name}"] for name in ("server-cert", "server-key", "root-cert")] == [
        "/certs/server.crt",
        "/certs/server.key",
        "/certs/ca.crt",
    ]


def test_the_proxy_terminates_mutual_tls_in_front_of_loopback_http_and_metrics(service):
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    proxy = compose["services"]["tls-proxy"]
    assert proxy["network_mode"] == "service:tritonserver"  # reaches tritonserver's loopback
    mounts = _mounts(proxy)
    assert mounts["/etc/nginx/certs"] == _mounts(service)["/certs"]
    conf = (COMPOSE_FILE.parent / mounts["/etc/nginx/nginx.conf"]).read_text()
    directives = dict(
        line.strip().rstrip(";").split(None, 1)
        for line in conf.splitlines()
        if line.strip().startswith(("listen", "ssl_", "proxy_pass", "server 127"))
        and not line.strip().startswith("ssl_session")
    )
    flags = _flags(service)
    assert directives["listen"] == "8443 ssl"
    assert directives["ssl_verify_client"] == "on"
    assert directives["ssl_certificate"] == "/etc/nginx/certs/server.crt"
    assert directives["ssl_certificate_key"] == "/etc/nginx/certs/server.key"
    assert directives["ssl_client_certificate"] == "/etc/nginx/certs/ca.crt"
    assert directives["server"] == f"127.0.0.1:{flags['http-port']}"
    assert f"proxy_pass http://127.0.0.1:{flags['metrics-port']};" in conf
    assert conf.count("{") == conf.count("}")


def test_restriction_keys_come_from_docker_secrets(service, tmp_path):
    """The entrypoint appends the same restriction flags `fintwin serve` passes, with the keys
    of the secret files, and refuses a key tritonserver would misread."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    script = _mounts(service)[service["entrypoint"][0]]
    assert service["entrypoint"][1] == "/opt/nvidia/nvidia_entrypoint.sh"
    assert set(service["secrets"]) == set(compose["secrets"]) == {
        "fintwin_api_key",
        "fintwin_admin_key",
    }
    api_key, admin_key = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    (tmp_path / "fintwin_api_key").write_text(api_key + "\n")
    (tmp_path / "fintwin_admin_key").write_text(admin_key)
    env = {"PATH": os.environ["PATH"], "FINTWIN_SECRETS_DIR": str(tmp_path)}
    run = subprocess.run(
        ["sh", str(COMPOSE_FILE.parent / script), "printf", "%s\\n", "tritonserver"],
        capture_output=True, text=True, env=env, check=True,
    )
    expected = AccessControl(api_key=api_key, admin_key=admin_key).flags()
    argv = run.stdout.splitlines()
    assert argv[0] == "tritonserver" and sorted(argv[1:]) == sorted(expected)

    (tmp_path / "fintwin_api_key").write_text("short,key:=\n")
    run = subprocess.run(
        ["sh", str(COMPOSE_FILE.parent / script), "true"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 2 and f"{tmp_path}/fintwin_api_key must be letters" in run.stderr
