"""The contract table is what an exported model takes and returns: its ONNX graph, its served
config.pbtxt and its fintwin.json follow it, and CONTRACT.md shows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from fintwin.cli import main
from fintwin.data.contract import (
    BATCH_AXIS,
    CONTRACT_KEY,
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    PADDING,
    SEQUENCE_AXIS,
    exported_contract,
    markdown_tables,
    model_inputs,
    random_inputs,
)
from fintwin.data.features import stored_spec
from fintwin.export.triton_repo import read_model_config

ROOT = Path(__file__).resolve().parents[2]
ONNX_DTYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}
TRITON_DTYPES = {"int64": mc.TYPE_INT64, "float32": mc.TYPE_FP32}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny trained twin exported as model ``twin``: its model directory."""
    repo = tmp_path_factory.mktemp("exported")
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo), "--name", "twin"]) == 0
    return repo / "twin"


@pytest.fixture(scope="module")
def sizes(exported) -> dict[str, int]:
    """The exported model's sizes, from what fintwin.json says of its vocabulary and settings."""
    metadata = json.loads((exported / "1" / "fintwin.json").read_text())
    spec = stored_spec(metadata, "fintwin.json")
    return {
        "vocab_size": spec.vocab.size,
        "quantiles": len(metadata["quantiles"]),
        "numeric_features": spec.n_numeric,
    }


def _onnx_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _expected_shape(axes: tuple[str, ...], sizes: dict[str, int]) -> list[int | str]:
    return [axis if axis in (BATCH_AXIS, SEQUENCE_AXIS) else sizes[axis] for axis in axes]


def test_onnx_graph_has_the_contracts_inputs_and_outputs(exported, sizes):
    graph = onnx.load(str(exported / "1" / "model.onnx")).graph
    specs = model_inputs(sizes)

    assert sizes == {"vocab_size": 5, "quantiles": 3, "numeric_features": 0}  # card, salary, transfer
    assert [v.name for v in graph.input] == [
        "event_type", "amount", "delta_t", "day_of_week", "day_of_month", "hour", "length",
        "days_since_last_event",
    ]
    for kind, values, expected in (("input", graph.input, specs), ("output", graph.output, MODEL_OUTPUTS)):
        assert [v.name for v in values] == [spec.name for spec in expected], kind
        for value, spec in zip(values, expected, strict=True):
            assert value.type.tensor_type.elem_type == ONNX_DTYPES[spec.dtype], spec.name
            assert _onnx_shape(value) == _expected_shape(spec.axes, sizes), spec.name
    assert _onnx_shape(graph.output[0]) == ["batch", 5]  # next_event_probs: one per type id


def test_served_config_has_the_contracts_inputs_and_outputs(exported, sizes):
    config = read_model_config(exported)

    for kind, tensors, expected in (
        ("input", config.input, model_inputs(sizes)),
        ("output", config.output, MODEL_OUTPUTS),
    ):
        assert [t.name for t in tensors] == [spec.name for spec in expected], kind
        for tensor, spec in zip(tensors, expected, strict=True):
            per_row = spec.axes == (BATCH_AXIS,)
            row_dims = [-1 if axis == SEQUENCE_AXIS else sizes[axis] for axis in spec.axes[1:]]
            assert tensor.data_type == TRITON_DTYPES[spec.dtype], spec.name
            assert list(tensor.dims) == ([1] if per_row else row_dims), spec.name
            assert tensor.HasField("reshape") == per_row, spec.name
    assert list(config.input[0].dims) == [-1] and list(config.output[2].dims) == [3]


def test_metadata_carries_the_contract_with_the_models_sizes(exported, sizes):
    contract = json.loads((exported / "1" / "fintwin.json").read_text())[CONTRACT_KEY]

    assert contract == exported_contract(sizes)
    bounds = {entry["name"]: (entry["low"], entry["high"], entry["closed"]) for entry in contract["inputs"]}
    assert bounds["event_type"] == (0, 5, "left")  # padding 0 .. the last type id 4
    assert bounds["day_of_month"] == (0, 32, "left")
    assert bounds["length"] == (1, "seq", "both")
    assert bounds["delta_t"] == (0.0, None, "left")
    assert "numeric" not in bounds


def test_contract_md_shows_the_table():
    text = (ROOT / "CONTRACT.md").read_text()

    assert markdown_tables() in text, "CONTRACT.md is stale: python -m fintwin.data.contract"
    for spec in (*MODEL_INPUTS, *MODEL_OUTPUTS):
        assert f"| `{spec.name}` |" in text


@pytest.mark.parametrize("n_numeric", [0, 2])
def test_random_inputs_are_valid_and_padded(n_numeric):
    sizes = {"vocab_size": 6, "numeric_features": n_numeric}
    inputs = random_inputs(np.random.default_rng(1), sizes, batch=40, seq_len=9)
    padding = np.arange(9)[None, :] >= inputs["length"][:, None]
    bounds = {  # [low, high) of the real values
        "event_type": (1, 6), "day_of_week": (0, 7), "day_of_month": (1, 32), "hour": (0, 24),
        "delta_t": (0.0, np.inf), "length": (1, 10), "days_since_last_event": (0.0, np.inf),
    }

    assert list(inputs) == [spec.name for spec in model_inputs(sizes)]
    assert ("numeric" in inputs) == (n_numeric > 0)
    assert inputs["length"][0] == 9  # one full row
    for spec in model_inputs(sizes):
        assert inputs[spec.name].dtype == np.dtype(spec.dtype), spec.name
        if spec.padded:
            assert (inputs[spec.name][padding] == PADDING).all(), spec.name
    for name, (low, high) in bounds.items():
        real = inputs[name][~padding] if inputs[name].ndim == 2 else inputs[name]
        assert low <= real.min() and real.max() < high, name
    assert np.isfinite(inputs["amount"]).all()
