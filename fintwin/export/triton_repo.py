"""Write exported ONNX models into a Triton model repository, one immutable version at a time.

Layout written for a model ``name``::

    <repo>/<name>/config.pbtxt     Triton ModelConfig (onnxruntime backend), shared by all versions
    <repo>/<name>/fintwin.json     metadata of the latest version (featuriser spec, metrics, ...)
    <repo>/<name>/<N>/model.onnx   the exported graph of version N
    <repo>/<name>/<N>/fintwin.json metadata of version N
    <repo>/<name>/<N>/fintwin.sha256 SHA-256 of the version's files (fintwin.export.integrity)

and, next to it, the live model ``<name>_live`` (python backend; ``fintwin.live.repository``)
through ``write_version_files``.

A new export adds version N+1 and never touches earlier versions. The version directory is
staged under a hidden, non-numeric name inside ``<name>/`` (Triton only loads numeric version
directories) and renamed into place as the last step, so a server polling the repository sees
either the complete version or nothing. Each file is written atomically and flushed to disk
(``fintwin.files.write_atomic``); files that are replaced (config, top-level metadata) are
staged next to the old ones and moved over them with ``os.replace``. When a write or rename
fails (full disk, read-only file system), every step already taken is undone by renames,
nothing staged is left behind, and a ModelRepositoryError names the path and cause.

All versions of a Triton model share one config, so a new version must have the same inputs
and outputs as the versions already there; an export with another signature needs a new name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from fintwin.data.features import FEATURISER_KEY
from fintwin.errors import FintwinInputError
from fintwin.export.integrity import write_manifest
from fintwin.files import sync_to_disk, write_atomic

# The production server image (serve/docker-compose.yml) and what it can run. Triton 24.10 is
# Triton 2.51.0, the same core as the tritonserver bundled in nvidia-pytriton 0.7.0, and ships
# ONNX Runtime 1.19.2, which reads ONNX IR versions <= 10 and default-domain opsets <= 21.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
TRITON_VERSION = "2.51.0"
MAX_ONNX_IR_VERSION = 10
MAX_ONNX_OPSET = 21

CONFIG_NAME = "config.pbtxt"
METADATA_NAME = "fintwin.json"
MODEL_FILENAME = "model.onnx"
STAGING_PREFIX = ".staging-"
COPY_CHUNK_BYTES = 1 << 20

ONNX_TO_TRITON_DTYPE = {
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
}

Device = Literal["cpu", "gpu"]


# What a remote client needs, published in the config (latest version's): the whole
# featuriser spec (metadata "featuriser") and the quantile levels of the time quantiles.
FEATURISER_PARAMETER = "fintwin_featuriser"
FEATURISER_KEYS = (FEATURISER_KEY, "quantiles")


class ModelRepositoryError(FintwinInputError):
    """A model repository (or a model written into it) is not usable, or cannot be written."""


def write_model_version(
    repo: Path,
    name: str,
    onnx_path: Path,
    metadata: dict[str, Any],
    *,
    device: Device = "cpu",
    max_batch_size: int = 256,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    instances: int = 1,
) -> int:
    """Add ``onnx_path`` to ``repo`` as the next version of model ``name``; return that version.

    The model config is derived from the ONNX graph (input/output names, dtypes, shapes), with
    dynamic batching on and ``instances`` model instances on each GPU (``device="gpu"``) or on
    the CPU. ``metadata`` (fintwin.export.onnx.export_metadata) is stored next to the model and
    in the version; its ``input_names``/``output_names`` are filled from the graph and must agree
    with it. An empty ``preferred_batch_sizes`` lets the batcher form the largest batch available.
    A full disk or read-only file system raises ModelRepositoryError and changes nothing.
    """
    graph_model = onnx.load(str(onnx_path), load_external_data=False)
    check_onnx_compatible(graph_model)
    config = build_model_config(
        name,
        graph_model,
        device=device,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
    )
    metadata = _metadata_with_io_names(metadata, config)
    featuriser = {k: metadata[k] for k in FEATURISER_KEYS if k in metadata}
    config.parameters[FEATURISER_PARAMETER].string_value = json.dumps(featuriser, sort_keys=True)
    return write_version_files(repo, name, {MODEL_FILENAME: Path(onnx_path)}, config, metadata)


def write_version_files(
    repo: Path,
    name: str,
    files: Mapping[str, Path],
    config: mc.ModelConfig,
    metadata: dict[str, Any],
) -> int:
    """Add a version of model ``name`` holding ``files`` (name in the version directory ->
    source file), with ``config`` as the model's config and ``metadata`` in the version and
    next to it; return the version. Used as is for models that are not one ONNX graph (the
    live model). A full disk or read-only file system raises ModelRepositoryError and changes
    nothing."""
    model_dir = Path(repo) / name
    created = _missing_directories(model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        _check_same_signature(model_dir, config)
        return _commit_version(model_dir, files, config, metadata)
    except OSError as exc:
        raise ModelRepositoryError(
            f"cannot add a version of model {name!r} to {model_dir}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename else "")
            + "; the repository is left as it was"
        ) from exc
    finally:
        if created and not model_versions(model_dir):
            _remove_empty(created)


def read_model_config(path: Path) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` (or the one inside a model directory) as Triton's ModelConfig."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise ModelRepositoryError(f"cannot read Triton model config {path}: {exc}") from exc


def format_model_config(config: mc.ModelConfig) -> str:
    """``config.pbtxt`` text of a ModelConfig."""
    return text_format.MessageToString(config, use_short_repeated_primitives=True)


def model_versions(model_dir: Path) -> list[int]:
    """Version numbers present in a model directory, ascending (staging directories ignored)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def check_onnx_compatible(graph_model: onnx.ModelProto) -> None:
    """Refuse a graph the production server cannot load: external weights, IR version, opset."""
    external = [
        t.name
        for t in graph_model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ModelRepositoryError(
            f"the ONNX file keeps weights {external[:3]} in separate files; only the single "
            f"{MODEL_FILENAME} is copied: export with external_data=False"
        )
    if graph_model.ir_version > MAX_ONNX_IR_VERSION:
        raise ModelRepositoryError(
            f"ONNX IR version {graph_model.ir_version} is newer than {TRITON_IMAGE} can load "
            f"(max {MAX_ONNX_IR_VERSION}); export with an older opset or move the image tag"
        )
    for opset in graph_model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_ONNX_OPSET:
            raise ModelRepositoryError(
                f"ONNX opset {opset.version} is newer than {TRITON_IMAGE} supports "
                f"(max {MAX_ONNX_OPSET}); export with opset_version<={MAX_ONNX_OPSET}"
            )


def build_model_config(
    name: str,
    graph_model: onnx.ModelProto,
    *,
    device: Device,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instances: int,
) -> mc.ModelConfig:
    """Triton ModelConfig for the onnxruntime backend, with inputs/outputs read from the graph."""
    _check_batching(max_batch_size, preferred_batch_sizes, max_queue_delay_us, instances)
    if device not in ("cpu", "gpu"):
        raise FintwinInputError(f"device must be 'cpu' or 'gpu', got {device!r}")
    config = mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=max_batch_size,
    )
    graph = graph_model.graph
    initializers = {init.name for init in graph.initializer}
    for value in graph.input:
        if value.name not in initializers:
            config.input.append(mc.ModelInput(name=value.name, **_tensor_fields(value)))
    for value in graph.output:
        config.output.append(mc.ModelOutput(name=value.name, **_tensor_fields(value)))
    config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.append(mc.ModelInstanceGroup(kind=kind, count=instances))
    return config


def _tensor_fields(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """data_type, dims (batch axis dropped, -1 where dynamic) and reshape of one graph tensor.

    A per-row scalar ([B] in the graph) has no dims left once the batch axis is dropped, which
    Triton does not allow; it is declared as dims [1] with ``reshape { shape: [] }``, so clients
    send [B, 1] and the model sees [B] (outputs: the model produces [B], clients get [B, 1]).
    """
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in ONNX_TO_TRITON_DTYPE:
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ModelRepositoryError(f"tensor {value.name!r} has unsupported dtype {dtype}")
    dims = tensor_type.shape.dim
    if not dims or dims[0].HasField("dim_value"):
        raise ModelRepositoryError(
            f"tensor {value.name!r} needs a dynamic batch axis first, got shape "
            f"{[d.dim_value if d.HasField('dim_value') else d.dim_param for d in dims]}"
        )
    fields: dict[str, Any] = {"data_type": ONNX_TO_TRITON_DTYPE[tensor_type.elem_type]}
    row_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:]]
    if row_dims:
        fields["dims"] = row_dims
    else:
        fields["dims"] = [1]
        fields["reshape"] = mc.ModelTensorReshape(shape=[])
    return fields


def _check_batching(
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instances: int,
) -> None:
    if max_batch_size < 1:
        raise FintwinInputError(
            f"max_batch_size must be >= 1 for dynamic batching, got {max_batch_size}"
        )
    bad = [size for size in preferred_batch_sizes if not 1 <= size <= max_batch_size]
    if bad:
        raise FintwinInputError(f"preferred batch sizes {bad} are outside [1, {max_batch_size}]")
    if max_queue_delay_us < 0:
        raise FintwinInputError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if instances < 1:
        raise FintwinInputError(f"instances must be >= 1, got {instances}")


def _metadata_with_io_names(metadata: dict[str, Any], config: mc.ModelConfig) -> dict[str, Any]:
    """Copy of ``metadata`` whose input/output names are those of the graph."""
    names = {
        "input_names": [t.name for t in config.input],
        "output_names": [t.name for t in config.output],
    }
    for key, graph_names in names.items():
        given = metadata.get(key)
        if given is not None and list(given) != graph_names:
            raise ModelRepositoryError(f"metadata {key} {list(given)} != ONNX graph {graph_names}")
    return {**metadata, **names}


def _check_same_signature(model_dir: Path, config: mc.ModelConfig) -> None:
    """Refuse a version whose inputs/outputs differ from the config its model already has."""
    config_path = model_dir / CONFIG_NAME
    if not config_path.exists() or not model_versions(model_dir):
        return
    current = read_model_config(config_path)
    if list(current.input) != list(config.input) or list(current.output) != list(config.output):
        raise ModelRepositoryError(
            f"the graph's inputs/outputs differ from those of the versions in {model_dir}; "
            "Triton shares one config across versions, so export it under a new model name"
        )


def _commit_version(
    model_dir: Path, files: Mapping[str, Path], config: mc.ModelConfig, metadata: dict[str, Any]
) -> int:
    """Stage the version and the new shared files, then publish them (see _publish)."""
    token = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging = model_dir / token
    metadata_bytes = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    contents = {CONFIG_NAME: format_model_config(config).encode(), METADATA_NAME: metadata_bytes}
    staged = {name: model_dir / f"{token}.{name}" for name in contents}
    backups = {name: model_dir / f"{token}.old.{name}" for name in contents}
    try:
        staging.mkdir()
        for file_name, source in files.items():
            write_atomic(staging / file_name, _chunks(source))
        write_atomic(staging / METADATA_NAME, [metadata_bytes])
        write_manifest(staging)
        for name, path in staged.items():
            write_atomic(path, [contents[name]])
        return _publish(model_dir, staging, staged, backups)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for path in [*staged.values(), *backups.values()]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _publish(
    model_dir: Path, staging: Path, staged: dict[str, Path], backups: dict[str, Path]
) -> int:
    """Replace the config, rename the version into place, replace the top-level metadata.

    The files replaced are first hard-linked to ``backups``, so that a failing step is undone by
    renames alone (no write needed on a full disk): the version goes back to ``staging``, the
    old files back to their names.
    """
    for name, backup in backups.items():
        if (model_dir / name).exists():
            os.link(model_dir / name, backup)
    replaced: list[str] = []
    version = None
    try:
        os.replace(staged[CONFIG_NAME], model_dir / CONFIG_NAME)
        replaced.append(CONFIG_NAME)
        version = _rename_to_next_version(staging, model_dir)
        os.replace(staged[METADATA_NAME], model_dir / METADATA_NAME)
        replaced.append(METADATA_NAME)
        sync_to_disk(model_dir)
        return version
    except OSError as exc:
        try:
            if version is not None:
                os.rename(model_dir / str(version), staging)
            for name in replaced:
                if backups[name].exists():
                    os.replace(backups[name], model_dir / name)
                else:
                    (model_dir / name).unlink()
            sync_to_disk(model_dir)
        except OSError as undo:
            raise ModelRepositoryError(
                f"cannot add a version to {model_dir}: {exc.strerror or exc}, and undoing the "
                f"steps taken failed too ({undo.strerror or undo}): check version {version} and "
                f"{', '.join(replaced)} there"
            ) from exc
        raise


def _rename_to_next_version(staging: Path, model_dir: Path) -> int:
    """Rename ``staging`` to the first free version number after the existing ones."""
    version = max(model_versions(model_dir), default=0) + 1
    while True:
        try:
            os.rename(staging, model_dir / str(version))
            return version
        except OSError:
            if not (model_dir / str(version)).exists():
                raise
            version += 1  # another export took this number first


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(COPY_CHUNK_BYTES):
            yield chunk


def _missing_directories(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories an export created, deepest first, where they are still empty."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()
