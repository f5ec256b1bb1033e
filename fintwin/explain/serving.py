"""The explanation model in a Triton model repository, written by `fintwin export` next to the
twin ``NAME``, and its client::

    <repo>/NAME_explain/config.pbtxt      python backend: raw events in, reasons out
    <repo>/NAME_explain/<N>/twin.pt       the twin's weights and hyper-parameters (PyTorch:
                                          integrated gradients need gradients, ONNX has none)
    <repo>/NAME_explain/<N>/fintwin.json  the featuriser spec, quantiles, provenance
    <repo>/NAME_explain/<N>/model.py      a two-line shim importing this module

One request holds the events of the customers to explain (``customer_id``, ``timestamp``
(ISO-8601), ``event_type``, ``amount`` and the twin's declared extras, one value per event,
shape [n]) and optionally ``output`` (the output to explain, default ``churn_prob``), ``top``
(reasons per customer, default 4) and ``as_of`` (the day the silence is counted to; default
the last event's day), each of shape [1]. The answer has one row per customer, in customer
order: ``customer_id``, ``prediction``, ``reference``, ``convergence_delta`` and ``reasons``
(a JSON list of ``{rank, kind, text, contribution, direction}``), as `fintwin explain` gives
them. A bad request (an unknown output, a bad event) is answered INVALID_ARG (HTTP 400, gRPC
INVALID_ARGUMENT) with the message `fintwin explain` would print.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tritonclient.grpc import model_config_pb2 as mc

from fintwin.data.features import FeaturiserSpec, stored_spec
from fintwin.errors import FintwinInputError
from fintwin.export.triton_repo import (
    FEATURISER_KEYS,
    FEATURISER_PARAMETER,
    ModelRepositoryError,
    model_versions,
    write_version_files,
)
from fintwin.models.module import TwinModule, to_plain

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton's python backend (in-process use, tests)
    pb_utils = None

WEIGHTS = "twin.pt"
SHIM_NAME = "model.py"
SHIM = (
    '"""Triton python backend entry point of a fintwin explanation model '
    '(fintwin.explain.serving)."""\n'
    "from fintwin.explain.serving import TritonPythonModel  # noqa: F401\n"
)
INTRA_OP_THREADS_PARAMETER = "intra_op_threads"
OPTIONS = {"output": "churn_prob", "top": 4, "as_of": ""}  # optional inputs and defaults
OUTPUTS = (("customer_id", mc.TYPE_STRING), ("prediction", mc.TYPE_FP32),
           ("reference", mc.TYPE_FP32), ("convergence_delta", mc.TYPE_FP32),
           ("reasons", mc.TYPE_STRING))
EXPLAIN_KEY = "explain"  # fintwin.json: what the explanation model holds


def explain_model_name(name: str) -> str:
    """The explanation model of twin ``name``."""
    return f"{name}_explain"


def event_inputs(spec: FeaturiserSpec) -> list[tuple[str, int]]:
    """The per-event inputs (name, Triton type) of a twin featurised by ``spec``."""
    inputs = [("customer_id", mc.TYPE_STRING), ("timestamp", mc.TYPE_STRING),
              ("event_type", mc.TYPE_STRING), ("amount", mc.TYPE_FP32)]
    inputs += [(name, mc.TYPE_FP32) for name in spec.numeric_features]
    inputs += [(name, mc.TYPE_STRING) for name in spec.categorical_features]
    clashes = sorted({name for name, _ in inputs} & set(OPTIONS))
    if clashes:
        raise ModelRepositoryError(f"the twin's feature columns {clashes} clash with the "
                                   f"explanation model's options {sorted(OPTIONS)}; rename them")
    return inputs


def explain_model_config(name: str, spec: FeaturiserSpec, metadata: Mapping[str, Any],
                         instances: int = 1) -> mc.ModelConfig:
    """The python-backend config of explanation model ``name`` (no batching: a request's rows
    are events, its answer's rows customers)."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    for field, kind in event_inputs(spec):
        config.input.append(mc.ModelInput(name=field, data_type=kind, dims=[-1]))
    for option, default in OPTIONS.items():
        kind = mc.TYPE_INT32 if isinstance(default, int) else mc.TYPE_STRING
        config.input.append(mc.ModelInput(name=option, data_type=kind, dims=[1], optional=True))
    for output, kind in OUTPUTS:
        config.output.append(mc.ModelOutput(name=output, data_type=kind, dims=[-1]))
    config.instance_group.append(
        mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances))
    config.parameters[INTRA_OP_THREADS_PARAMETER].string_value = "1"
    featuriser = {key: metadata[key] for key in FEATURISER_KEYS if key in metadata}
    config.parameters[FEATURISER_PARAMETER].string_value = json.dumps(featuriser, sort_keys=True)
    return config


def explain_files(model: TwinModule, scratch: Path) -> dict[str, Path]:
    """Write an explanation model version's files into ``scratch`` (before the repository is
    touched): the twin's weights and hyper-parameters, and the shim."""
    weights, shim = Path(scratch) / WEIGHTS, Path(scratch) / SHIM_NAME
    torch.save({"hyper_parameters": to_plain(dict(model.hparams)),
                "state_dict": model.state_dict()}, weights)
    shim.write_text(SHIM)
    return {WEIGHTS: weights, SHIM_NAME: shim}


def write_explain_model(repo: Path, name: str, spec: FeaturiserSpec, metadata: Mapping[str, Any],
                        files: Mapping[str, Path], instances: int = 1) -> int:
    """Add a version of ``explain_model_name(name)`` to ``repo`` holding ``files``
    (``explain_files``) and the batch model's ``metadata`` without its graph's contract;
    return the version."""
    from fintwin.explain.attribution import REFERENCE

    kept = {key: value for key, value in metadata.items()
            if key not in ("contract", "input_names", "output_names", "parity_max_abs")}
    kept[EXPLAIN_KEY] = {"weights": WEIGHTS, "reference": REFERENCE}
    explain = explain_model_name(name)
    config = explain_model_config(explain, spec, kept, instances)
    return write_version_files(repo, explain, files, config, kept)


def load_version_dir(version_dir: Path) -> tuple[TwinModule, FeaturiserSpec]:
    """The twin (eval mode) and featuriser spec of one explanation model version."""
    weights = Path(version_dir) / WEIGHTS
    metadata_path = Path(version_dir) / "fintwin.json"
    if not weights.is_file() or not metadata_path.is_file():
        raise ModelRepositoryError(f"{version_dir} lacks {WEIGHTS} or fintwin.json; export the "
                                   "twin again with `fintwin export`")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = TwinModule(**state["hyper_parameters"])
    model.load_state_dict(state["state_dict"])
    spec = stored_spec(json.loads(metadata_path.read_text()), str(metadata_path))
    return model.eval(), spec


def load_explain_version(repo: str | Path, name: str, version: int | None = None
                         ) -> tuple[TwinModule, FeaturiserSpec]:
    """The twin and spec of ``<repo>/NAME_explain`` (its latest version by default)."""
    model_dir = Path(repo) / explain_model_name(name)
    versions = model_versions(model_dir)
    if not versions:
        twin = " (the twin is there: export it again with this fintwin)" if (
            Path(repo) / name).is_dir() else ""
        raise ModelRepositoryError(f"no explanation model {model_dir.name!r} in {repo}{twin}")
    version = versions[-1] if version is None else version
    if version not in versions:
        raise ModelRepositoryError(f"{model_dir.name!r} has versions {versions}, not {version}")
    return load_version_dir(model_dir / str(version))


def request_frame(columns: Mapping[str, np.ndarray], spec: FeaturiserSpec) -> pd.DataFrame:
    """The event table of a request's per-event inputs (text decoded as UTF-8)."""
    frame = {}
    for field, kind in event_inputs(spec):
        if field not in columns:
            raise FintwinInputError(f"request: missing input {field!r}; every event needs "
                                    f"{[f for f, _ in event_inputs(spec)]}")
        values = np.asarray(columns[field]).reshape(-1)
        frame[field] = ([v.decode() if isinstance(v, bytes) else str(v) for v in values]
                        if kind == mc.TYPE_STRING else values.astype(np.float64))
    sizes = {name: len(values) for name, values in frame.items()}
    if len(set(sizes.values())) != 1:
        raise FintwinInputError(f"request: inputs hold different numbers of events {sizes}")
    return pd.DataFrame(frame)


def option(columns: Mapping[str, np.ndarray], name: str) -> Any:
    """An optional scalar input, or its default."""
    if name not in columns:
        return OPTIONS[name]
    value = np.asarray(columns[name]).reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value.item()


def answer(explainer, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One request's outputs (``FintwinInputError`` on a bad request)."""
    explanations = explainer.explain(
        request_frame(columns, explainer.spec), option(columns, "output"),
        top=int(option(columns, "top")), as_of=option(columns, "as_of") or None)
    return {
        "customer_id": np.array([e.customer_id.encode() for e in explanations], dtype=object),
        "prediction": np.array([e.prediction for e in explanations], np.float32),
        "reference": np.array([e.reference for e in explanations], np.float32),
        "convergence_delta": np.array([e.convergence_delta for e in explanations], np.float32),
        "reasons": np.array([json.dumps([r.to_dict() for r in e.reasons]).encode()
                             for e in explanations], dtype=object),
    }


class TritonPythonModel:
    """Triton python-backend entry point: one instance per model instance (stub process)."""

    def initialize(self, args: dict) -> None:
        from fintwin.explain.explainer import Explainer

        config = json.loads(args["model_config"])
        threads = config.get("parameters", {}).get(INTRA_OP_THREADS_PARAMETER, {})
        torch.set_num_threads(int(threads.get("string_value") or 1))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.explainer = Explainer(*load_version_dir(version_dir))
        pb_utils.Logger.log_info(f"explanation model {config['name']} version "
                                 f"{args['model_version']}: {version_dir / WEIGHTS}")

    def execute(self, requests: list) -> list:
        """One response per request; a bad request gets a TritonError, never a raise."""
        responses = []
        for request in requests:
            try:
                columns = {t.name(): t.as_numpy() for t in request.inputs()}
                outputs = answer(self.explainer, columns)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(value))
                    for name, value in outputs.items()]))
            except Exception as exc:  # never let an exception out of execute
                error = pb_utils.TritonError
                code = error.INVALID_ARG if isinstance(exc, FintwinInputError) else error.INTERNAL
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=error(str(exc), code)))
        return responses


def explain_served(client, model: str, events: pd.DataFrame, output: str = "churn_prob",
                   top: int = 4, as_of: str = "", spec_columns: Sequence[str] = ()
                   ) -> list[dict[str, Any]]:
    """Ask a served explanation ``model`` (a ``tritonclient.grpc`` or ``.http``
    ``InferenceServerClient``) to explain ``events``' customers; one dict per customer
    (``customer_id``, ``prediction``, ``reference``, ``convergence_delta``, ``reasons``).
    ``spec_columns``: the twin's extra columns to send."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    columns: dict[str, np.ndarray] = {
        "customer_id": events["customer_id"].astype(str).to_numpy(dtype=object),
        "timestamp": pd.to_datetime(events["timestamp"]).dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
        .to_numpy(dtype=object),
        "event_type": events["event_type"].astype(str).to_numpy(dtype=object),
        "amount": events["amount"].to_numpy(np.float32),
    }
    for name in spec_columns:
        values = events[name]
        columns[name] = (values.to_numpy(np.float32) if pd.api.types.is_numeric_dtype(values)
                         else values.astype(str).to_numpy(dtype=object))
    columns |= {"output": np.array([output], dtype=object), "top": np.array([top], np.int32),
                "as_of": np.array([as_of], dtype=object)}
    inputs = []
    for name, array in columns.items():
        if array.dtype == object:
            array = np.array([str(v).encode() for v in array], dtype=object)
        kind = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}.get(array.dtype, "BYTES")
        tensor = module.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs)
    return [
        {"customer_id": cid.decode(), "prediction": float(p), "reference": float(r),
         "convergence_delta": float(d), "reasons": json.loads(reasons)}
        for cid, p, r, d, reasons in zip(
            result.as_numpy("customer_id"), result.as_numpy("prediction"),
            result.as_numpy("reference"), result.as_numpy("convergence_delta"),
            result.as_numpy("reasons"), strict=True)
    ]

