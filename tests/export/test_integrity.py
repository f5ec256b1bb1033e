"""Integrity manifests: written by every export (batch and live models), checked by serve."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from fintwin.cli import main
from fintwin.export.integrity import MANIFEST_NAME, IntegrityError, verify_version
from fintwin.export.triton_repo import write_model_version, write_version_files
from tests.export.test_triton_repo import tiny_graph

METADATA = {"vocab": {"buy": 2}, "max_len": 8}


@pytest.fixture
def version(tmp_path):
    write_model_version(tmp_path / "repo", "twin", tiny_graph(tmp_path / "tiny.onnx"), METADATA)
    return tmp_path / "repo" / "twin" / "1"


def test_export_records_the_sha256_of_every_file_of_the_version(version):
    lines = (version / MANIFEST_NAME).read_text().splitlines()
    assert lines == [
        f"{hashlib.sha256((version / name).read_bytes()).hexdigest()}  {name}"
        for name in ("fintwin.json", "model.onnx")
    ]
    verify_version(version)
    checked = subprocess.run(["sha256sum", "-c", MANIFEST_NAME], cwd=version,
                             capture_output=True, text=True, check=True)
    assert checked.stdout.split() == ["fintwin.json:", "OK", "model.onnx:", "OK"]


def test_a_live_model_version_is_covered_with_its_nested_files(tmp_path):
    step, shim = tmp_path / "step.onnx", tmp_path / "model.py"
    step.write_bytes(b"step graph bytes")
    shim.write_text("from fintwin.live.triton_model import TritonPythonModel\n")
    config = mc.ModelConfig(name="twin_live", backend="python", max_batch_size=4)
    write_version_files(tmp_path / "repo", "twin_live", {"step.onnx": step, "model.py": shim},
                        config, {"step": {}})
    version = tmp_path / "repo" / "twin_live" / "1"
    assert [line.split("  ")[1] for line in (version / MANIFEST_NAME).read_text().splitlines()] == [
        "fintwin.json", "model.py", "step.onnx"]
    (version / "__pycache__").mkdir()
    (version / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    with pytest.raises(IntegrityError, match=r"not exported: __pycache__/model\.cpython-311\.pyc"):
        verify_version(version)


@pytest.mark.parametrize("tamper, named", [
    (lambda v: _flip_byte(v / "model.onnx"), "changed: model.onnx"),
    (lambda v: (v / "fintwin.json").unlink(), "missing: fintwin.json"),
    (lambda v: (v / "extra.onnx").write_bytes(b"x"), "not exported: extra.onnx"),
])
def test_a_changed_missing_or_extra_file_is_named(version, tamper, named):
    tamper(version)
    with pytest.raises(IntegrityError, match=named) as error:
        verify_version(version)
    assert str(version) in str(error.value) and "export the model again" in str(error.value)


def test_a_version_without_a_readable_manifest_is_refused(version):
    manifest = version / MANIFEST_NAME
    manifest.write_text(manifest.read_text() + "not a line\n")
    with pytest.raises(IntegrityError, match=f"{manifest} line 3: expected"):
        verify_version(version)
    manifest.unlink()
    with pytest.raises(IntegrityError, match=f"no integrity manifest {MANIFEST_NAME}"):
        verify_version(version)


def test_serve_refuses_a_version_whose_model_onnx_changed(version, caplog):
    _flip_byte(version / "model.onnx")
    assert main(["serve", "--repo", str(version.parent.parent), "--http-port", "0"]) == 2
    assert f"version {version} differs from its integrity manifest" in caplog.text
    assert "changed: model.onnx" in caplog.text


def _flip_byte(path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
