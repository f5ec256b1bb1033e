"""`fintwin export` of a trained checkpoint: metadata without local paths; a full disk exits 2
and leaves the repository as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.onnx

from fintwin.cli import main
from fintwin.export import triton_repo
from fintwin.export.triton_repo import FEATURISER_PARAMETER, read_model_config

NO_SPACE = os.strerror(errno.ENOSPC)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint) -> Path:
    repo = tmp_path_factory.mktemp("exported")
    assert (
        main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo), "--name", "twin"]) == 0
    )
    return repo


def _export(ckpt: Path, repo: Path) -> int:
    return main(["export", "--ckpt", str(ckpt), "--repo", str(repo), "--name", "twin"])


def _strings(value) -> Iterator[str]:
    """Every key and string value in a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_metadata_identifies_the_checkpoint_without_any_path(exported, tiny_checkpoint):
    model_dir = exported / "twin"
    featuriser = read_model_config(model_dir).parameters[FEATURISER_PARAMETER].string_value
    documents = [
        json.loads((model_dir / "1" / "fintwin.json").read_text()),
        json.loads((model_dir / "fintwin.json").read_text()),
        json.loads(featuriser),
    ]
    checkpoint_sha = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()

    assert documents[0]["checkpoint"] == {"file": "last.ckpt", "sha256": checkpoint_sha}
    assert documents[1] == documents[0]
    training_dir = str(tiny_checkpoint.parent.parent)
    for document in documents:
        strings = list(_strings(document))
        assert len(strings) > 10
        assert [s for s in strings if os.path.isabs(s) or training_dir in s] == []


def test_full_disk_in_the_repository_exits_2_and_keeps_it(
    exported, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    repo = tmp_path / "repo"
    shutil.copytree(exported, repo)
    before = _files(repo)
    real_write = triton_repo.write_atomic

    def write(path: Path, chunks) -> None:
        if path.name != "model.onnx":
            return real_write(path, chunks)
        path.write_bytes(next(iter(chunks))[:1000])
        raise OSError(errno.ENOSPC, NO_SPACE, str(path))

    monkeypatch.setattr(triton_repo, "write_atomic", write)

    assert _export(tiny_checkpoint, repo) == 2

    err = capsys.readouterr().err
    assert err.startswith(
        f"fintwin: error: cannot add a version of model 'twin' to {repo / 'twin'}: {NO_SPACE} ("
    )
    assert "model.onnx); the repository is left as it was" in err
    assert "Traceback" not in err
    assert _files(repo) == before  # version 1, config and metadata byte-identical, nothing staged


def test_full_scratch_disk_exits_2_before_touching_the_repository(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def save(self, destination, **kwargs) -> None:
        Path(destination).write_bytes(b"half an onnx file")
        raise OSError(errno.ENOSPC, NO_SPACE, str(destination))

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save)

    assert _export(tiny_checkpoint, tmp_path / "repo") == 2

    err = capsys.readouterr().err
    assert err.startswith(f"fintwin: error: cannot write the ONNX export to {scratch}/")
    assert f"model.onnx: {NO_SPACE} (it is written there, in TMPDIR," in err
    assert not (tmp_path / "repo").exists()
    assert list(scratch.iterdir()) == []
