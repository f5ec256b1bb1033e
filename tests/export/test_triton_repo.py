"""Triton model repository: config from the ONNX graph, immutable versions, atomic writes."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from fintwin.export import integrity, triton_repo
from fintwin.export.triton_repo import (
    STAGING_PREFIX,
    ModelRepositoryError,
    model_versions,
    read_model_config,
    write_model_version,
)

VOCAB_SIZE = 5
NUM_FEATURES = 3


def tiny_graph(
    path: Path, *, vocab_size: int = VOCAB_SIZE, ir_version: int = 10, opset: int = 18
) -> Path:
    """A valid ONNX graph with the contract's kinds of tensors: [B,T] int64/fp32, [B,T,F], [B]."""
    batch_seq = ["batch", "seq"]
    inputs = [
        helper.make_tensor_value_info("event_type", TensorProto.INT64, batch_seq),
        helper.make_tensor_value_info("amount", TensorProto.FLOAT, batch_seq),
        helper.make_tensor_value_info("numeric", TensorProto.FLOAT, [*batch_seq, NUM_FEATURES]),
        helper.make_tensor_value_info("length", TensorProto.INT64, ["batch"]),
    ]
    outputs = [
        helper.make_tensor_value_info("next_event_probs", TensorProto.FLOAT, ["batch", vocab_size]),
        helper.make_tensor_value_info("churn_prob", TensorProto.FLOAT, ["batch"]),
    ]
    weights = numpy_helper.from_array(np.linspace(-1, 1, vocab_size, dtype=np.float32)[None], "w")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceSum", ["amount", "axes"], ["total"], keepdims=1),
        helper.make_node("MatMul", ["total", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["next_event_probs"], axis=-1),
        helper.make_node("Cast", ["length"], ["length_f"], to=TensorProto.FLOAT),
        helper.make_node("Sigmoid", ["length_f"], ["churn_prob"]),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=[weights, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return tiny_graph(tmp_path / "tiny.onnx")


METADATA = {"vocab": {"buy": 2, "return": 3, "visit": 4}, "horizon_days": 90.0, "max_len": 64}


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_config_parses_as_triton_model_config_and_matches_the_graph(tmp_path, onnx_file):
    version = write_model_version(
        tmp_path,
        "twin",
        onnx_file,
        METADATA,
        device="cpu",
        max_batch_size=32,
        preferred_batch_sizes=[4, 16],
        max_queue_delay_us=250,
        instances=2,
    )

    assert version == 1
    config = read_model_config(tmp_path / "twin" / "config.pbtxt")
    assert isinstance(config, mc.ModelConfig)
    assert (config.name, config.platform, config.backend) == (
        "twin",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 2)
    ]
    inputs = {
        t.name: (mc.DataType.Name(t.data_type), list(t.dims), t.HasField("reshape"))
        for t in config.input
    }
    assert inputs == {
        "event_type": ("TYPE_INT64", [-1], False),
        "amount": ("TYPE_FP32", [-1], False),
        "numeric": ("TYPE_FP32", [-1, NUM_FEATURES], False),
        "length": ("TYPE_INT64", [1], True),
    }
    assert list(next(t for t in config.input if t.name == "length").reshape.shape) == []
    outputs = {
        t.name: (mc.DataType.Name(t.data_type), list(t.dims), t.HasField("reshape"))
        for t in config.output
    }
    assert outputs == {
        "next_event_probs": ("TYPE_FP32", [VOCAB_SIZE], False),
        "churn_prob": ("TYPE_FP32", [1], True),
    }


def test_config_io_is_what_onnxruntime_sees(tmp_path, onnx_file):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)
    config = read_model_config(tmp_path / "twin")
    runtime = ort.InferenceSession(
        str(tmp_path / "twin" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    for tensors, nodes in [
        (config.input, runtime.get_inputs()),
        (config.output, runtime.get_outputs()),
    ]:
        assert [t.name for t in tensors] == [n.name for n in nodes]
        for tensor, node in zip(tensors, nodes, strict=True):
            model_shape = (
                list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
            )
            assert len(model_shape) == len(node.shape) - 1  # Triton dims exclude the batch axis


def test_gpu_export_asks_for_gpu_instances(tmp_path, onnx_file):
    write_model_version(tmp_path, "twin", onnx_file, METADATA, device="gpu", instances=3)
    config = read_model_config(tmp_path / "twin")
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, 3)
    ]


def test_layout_and_metadata_per_version(tmp_path, onnx_file):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)

    model_dir = tmp_path / "twin"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "fintwin.json"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == [
        "fintwin.json",
        "fintwin.sha256",
        "model.onnx",
    ]
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    stored = json.loads((model_dir / "1" / "fintwin.json").read_text())
    assert stored["vocab"] == METADATA["vocab"] and stored["horizon_days"] == 90.0
    assert stored["input_names"] == ["event_type", "amount", "numeric", "length"]
    assert stored["output_names"] == ["next_event_probs", "churn_prob"]
    assert json.loads((model_dir / "fintwin.json").read_text()) == stored


def test_second_export_adds_version_two_and_leaves_version_one_untouched(tmp_path, onnx_file):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)
    version_one = _files(tmp_path / "twin" / "1")
    retrained = tiny_graph(tmp_path / "retrained.onnx")
    metadata_two = {**METADATA, "metrics": {"nll": 1.5}, "source_commit": "abc123"}

    version = write_model_version(tmp_path, "twin", retrained, metadata_two, max_batch_size=8)

    assert version == 2
    assert model_versions(tmp_path / "twin") == [1, 2]
    assert _files(tmp_path / "twin" / "1") == version_one
    assert (
        json.loads((tmp_path / "twin" / "2" / "fintwin.json").read_text())["source_commit"]
        == "abc123"
    )
    assert json.loads((tmp_path / "twin" / "fintwin.json").read_text())["source_commit"] == "abc123"
    assert "source_commit" not in json.loads((tmp_path / "twin" / "1" / "fintwin.json").read_text())
    assert read_model_config(tmp_path / "twin").max_batch_size == 8


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))
RETRAINED = {**METADATA, "vocab": {"buy": 2, "return": 4, "visit": 3}, "source_commit": "new"}


def _failing_write(monkeypatch, error: OSError, fails_on, module=triton_repo) -> None:
    """Writes (by ``module``) of files matching ``fails_on`` stop half-way with ``error`` (a
    full disk)."""
    real_write = module.write_atomic

    def write(path: Path, chunks) -> None:
        if not fails_on(path):
            return real_write(path, chunks)
        data = chunks if isinstance(chunks, bytes) else b"".join(chunks)
        path.write_bytes(data[: len(data) // 2])
        raise OSError(error.errno, error.strerror, str(path))

    monkeypatch.setattr(module, "write_atomic", write)


def _failing_rename(monkeypatch, function: str, error: OSError, fails_on) -> None:
    """``os.<function>(src, dst)`` raises ``error`` where ``fails_on(dst)``."""
    real = getattr(os, function)

    def rename(src, dst, *args, **kwargs):
        if fails_on(Path(dst)):
            raise OSError(error.errno, error.strerror, str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, function, rename)


def _raises(error: OSError):
    def fail(*args, **kwargs):
        raise error

    return fail


def _is_staged(path: Path) -> bool:
    return any(part.startswith(STAGING_PREFIX) for part in path.parts)


FAILURES = {  # where the disk gives out -> how to make it give out there
    "model.onnx": lambda mp: _failing_write(
        mp, ENOSPC, lambda p: p.name == "model.onnx" and _is_staged(p)
    ),
    "version metadata": lambda mp: _failing_write(
        mp, ENOSPC, lambda p: p.name == "fintwin.json" and _is_staged(p.parent)
    ),
    "integrity manifest": lambda mp: _failing_write(
        mp, ENOSPC, lambda p: p.name == integrity.MANIFEST_NAME, integrity
    ),
    "config.pbtxt": lambda mp: _failing_write(
        mp, ENOSPC, lambda p: p.name.endswith("config.pbtxt")
    ),
    "backup link": lambda mp: mp.setattr(os, "link", _raises(EROFS)),
    "version rename": lambda mp: _failing_rename(mp, "rename", EROFS, lambda p: p.name.isdigit()),
    "metadata replace": lambda mp: _failing_rename(
        mp, "replace", ENOSPC, lambda p: p.name == "fintwin.json" and not _is_staged(p)
    ),
}


@pytest.mark.parametrize("where", FAILURES)
def test_full_or_read_only_disk_leaves_the_repository_as_it_was(
    tmp_path, onnx_file, monkeypatch, where
):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)
    before = _files(tmp_path)
    FAILURES[where](monkeypatch)

    with pytest.raises(ModelRepositoryError) as error:
        write_model_version(tmp_path, "twin", onnx_file, RETRAINED, max_batch_size=8)
    monkeypatch.undo()

    message = str(error.value)
    assert f"cannot add a version of model 'twin' to {tmp_path / 'twin'}: " in message
    assert re.search("No space left on device|Read-only file system", message), message
    assert "the repository is left as it was" in message
    assert _files(tmp_path) == before  # config, metadata and version 1 byte-identical
    assert sorted(p.name for p in (tmp_path / "twin").iterdir()) == [
        "1",
        "config.pbtxt",
        "fintwin.json",
    ]  # no version 2, nothing staged
    assert write_model_version(tmp_path, "twin", onnx_file, RETRAINED) == 2


def test_failing_write_names_the_file(tmp_path, onnx_file, monkeypatch):
    _failing_write(monkeypatch, ENOSPC, lambda p: p.name == "model.onnx")
    with pytest.raises(ModelRepositoryError, match=r"No space left on device \(.*model\.onnx\)"):
        write_model_version(tmp_path, "twin", onnx_file, METADATA)


def test_failed_first_export_leaves_no_directory(tmp_path, onnx_file, monkeypatch):
    _failing_write(monkeypatch, ENOSPC, lambda p: p.name.endswith("config.pbtxt"))
    with pytest.raises(ModelRepositoryError, match="No space left on device"):
        write_model_version(tmp_path / "new_repo", "twin", onnx_file, METADATA)

    assert list(tmp_path.iterdir()) == [onnx_file]


def test_a_failed_undo_says_what_to_check(tmp_path, onnx_file, monkeypatch):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)
    _failing_rename(
        monkeypatch, "replace", ENOSPC, lambda p: p.name == "fintwin.json" and not _is_staged(p)
    )
    _failing_rename(monkeypatch, "rename", EROFS, _is_staged)  # moving version 2 back

    with pytest.raises(ModelRepositoryError) as error:
        write_model_version(tmp_path, "twin", onnx_file, RETRAINED)

    message = str(error.value)
    assert "No space left on device, and undoing the steps taken failed too" in message
    assert "(Read-only file system): check version 2 and config.pbtxt there" in message


def test_leftover_staging_directory_is_ignored(tmp_path, onnx_file):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)
    stray = tmp_path / "twin" / f"{STAGING_PREFIX}killed"
    stray.mkdir()
    shutil.copyfile(onnx_file, stray / "model.onnx")

    assert model_versions(tmp_path / "twin") == [1]
    assert write_model_version(tmp_path, "twin", onnx_file, METADATA) == 2


def test_concurrent_exports_get_distinct_complete_versions(tmp_path, onnx_file):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)
    versions: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: versions.append(
                write_model_version(tmp_path, "twin", onnx_file, METADATA)
            )
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(versions) == [2, 3, 4, 5]
    for version in versions:
        assert (
            tmp_path / "twin" / str(version) / "model.onnx"
        ).read_bytes() == onnx_file.read_bytes()


def test_new_signature_under_the_same_name_is_refused(tmp_path, onnx_file):
    write_model_version(tmp_path, "twin", onnx_file, METADATA)
    bigger_vocab = tiny_graph(tmp_path / "bigger.onnx", vocab_size=VOCAB_SIZE + 1)

    with pytest.raises(ModelRepositoryError, match="new model name"):
        write_model_version(tmp_path, "twin", bigger_vocab, METADATA)

    assert model_versions(tmp_path / "twin") == [1]
    assert write_model_version(tmp_path, "twin_v2", bigger_vocab, METADATA) == 1


def test_metadata_io_names_must_match_the_graph(tmp_path, onnx_file):
    with pytest.raises(ModelRepositoryError, match="input_names"):
        write_model_version(
            tmp_path, "twin", onnx_file, {**METADATA, "input_names": ["event_type"]}
        )
    assert not (tmp_path / "twin").exists() or model_versions(tmp_path / "twin") == []


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"ir_version": 11}, "IR version 11"), ({"opset": 22}, "opset 22")],
)
def test_graph_too_new_for_the_production_image_is_refused(tmp_path, kwargs, words):
    with pytest.raises(ModelRepositoryError, match=words):
        write_model_version(tmp_path, "twin", tiny_graph(tmp_path / "new.onnx", **kwargs), METADATA)


def test_graph_with_external_weights_is_refused(tmp_path, onnx_file):
    model = onnx.load(str(onnx_file))
    onnx.save(model, str(tmp_path / "split.onnx"), save_as_external_data=True, size_threshold=0)
    with pytest.raises(ModelRepositoryError, match="external_data=False"):
        write_model_version(tmp_path, "twin", tmp_path / "split.onnx", METADATA)


def test_fixed_batch_axis_is_refused(tmp_path, onnx_file):
    model = onnx.load(str(onnx_file))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    with pytest.raises(ModelRepositoryError, match="'event_type' needs a dynamic batch axis"):
        write_model_version(tmp_path, "twin", tmp_path / "fixed.onnx", METADATA)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_batch_size": 8, "preferred_batch_sizes": [16]}, r"\[16\] are outside \[1, 8\]"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"instances": 0}, "instances"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_batching_settings_are_refused(tmp_path, onnx_file, kwargs, words):
    with pytest.raises(ValueError, match=words):
        write_model_version(tmp_path, "twin", onnx_file, METADATA, **kwargs)


def test_read_model_config_rejects_garbage(tmp_path):
    (tmp_path / "config.pbtxt").write_text("max_batch_size: lots\n")
    with pytest.raises(ModelRepositoryError, match="cannot read Triton model config"):
        read_model_config(tmp_path / "config.pbtxt")
