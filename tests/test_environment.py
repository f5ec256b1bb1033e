"""The locked environment agrees with pyproject.toml, the Makefile and the GPU image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_train import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
LOCK = (ROOT / "requirements.lock").read_text()
DOCKERFILE = (ROOT / "Dockerfile.cuda").read_text()
TORCH_PIN = re.compile(r"torch==([\d.]+)")


def locked_versions() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", LOCK, re.M)
    return {canonicalize_name(name): version for name, version in pins}


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_dependency_is_locked_within_its_range() -> None:
    locked = locked_versions()
    environment = default_environment() | {"platform_system": "Linux", "platform_machine": "x86_64"}
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate(environment)):
            continue
        assert name in locked, f"{requirement} is not in requirements.lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]} outside {requirement.specifier}"
        )


def test_every_locked_version_has_a_hash() -> None:
    hashed = re.findall(r"^[A-Za-z0-9_.-]+==[^\n]* \\\n\s+--hash=sha256:[0-9a-f]{64}", LOCK, re.M)
    assert len(hashed) == len(locked_versions()) > 50


def test_one_torch_version_everywhere() -> None:
    project_torch = next(r for r in project_requirements() if r.name == "torch")
    pins = {
        "constraints.txt": TORCH_PIN.findall((ROOT / "constraints.txt").read_text()),
        "Makefile": TORCH_PIN.findall((ROOT / "Makefile").read_text()),
        "Dockerfile.cuda": TORCH_PIN.findall(DOCKERFILE),
        ".ci/latest": TORCH_PIN.findall((ROOT / ".ci" / "latest").read_text()),
    }
    assert all(len(found) == 1 for found in pins.values()), pins
    versions = {found[0] for found in pins.values()}
    assert len(versions) == 1 and project_torch.specifier.contains(versions.pop())
    assert not re.search(r"^torch==", LOCK, re.M)  # each install brings its own build


def test_gpu_image_installs_the_lock_with_the_python_it_was_resolved_for() -> None:
    lock_python = re.search(r"pip-compile with Python (\d+\.\d+)", LOCK).group(1)
    bases = re.findall(r"^FROM python:(\d+\.\d+)\.\d+-slim", DOCKERFILE, re.M)
    assert bases and set(bases) == {lock_python}
    assert "pip install --require-hashes --no-deps -r requirements.lock" in DOCKERFILE
    assert "COPY requirements.lock" in DOCKERFILE


def test_gpu_image_command_composes(tmp_path: Path) -> None:
    command = re.search(r"^CMD (\[.*\])", DOCKERFILE, re.M).group(1)
    argv = [part.strip('" ') for part in command.strip("[]").split(",")]
    assert argv[:2] == ["python", "train.py"]
    cfg = compose_cfg(tmp_path, argv[2:])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


def test_ci_runs_the_readme_test_command_on_the_lock() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.startswith("#")]
    assert "make test" in commands
    assert re.search(r"^make test\b", (ROOT / "README.md").read_text(), re.M)
    assert "--require-hashes --no-deps -r $(LOCK)" in (ROOT / "Makefile").read_text()
