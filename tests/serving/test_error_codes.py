"""Status codes over the wire: the client's mistakes are 400 / INVALID_ARGUMENT with the input,
row and expected value named; a fault on the server's side is 500 / INTERNAL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from fintwin.export.triton_repo import write_model_version
from fintwin.serving.python_model import (
    CONTRACT_KEY,
    FEATURISER_KEY,
    OnnxModel,
    config_parameter,
)
from fintwin.serving.server import EmbeddedTriton

Inputs = dict[str, np.ndarray]
CLIENTS = {"grpc": grpcclient, "http": httpclient}
STATUS = {  # tritonclient's InferenceServerException.status() per protocol
    "grpc": {400: "StatusCode.INVALID_ARGUMENT", 500: "StatusCode.INTERNAL"},
    "http": {400: "400", 500: "500"},
}
FAULTY_MODEL = "faulty"
FAULTY_VOCAB, FAULTY_TABLE_ROWS = 12, 4
FAULTY_METADATA = {  # the faulty graph's contract: event ids in [0, 12)
    CONTRACT_KEY: {
        "inputs": [{"name": "event_type", "dtype": "int64", "shape": ["batch", "seq"], "low": 0,
                    "high": FAULTY_VOCAB, "closed": "left", "finite": False}],
        "outputs": [{"name": "next_event_probs", "dtype": "float32",
                     "shape": ["batch", FAULTY_VOCAB]}],
    }
}


def _with(name: str, make: Callable[[Inputs], np.ndarray]) -> Callable[[Inputs], Inputs]:
    return lambda inputs: {**inputs, name: make(inputs)}


def _at(name: str, row: int, position: int, value: float) -> Callable[[Inputs], Inputs]:
    def corrupt(inputs: Inputs) -> Inputs:
        array = inputs[name].copy()
        array[row, position] = value
        return {**inputs, name: array}

    return corrupt


# (case id, a bad request made from a valid B=3 T=5 one, words its 400 message must hold).
# Values model.py checks; dtype and batch size are checked by Triton itself.
CLIENT_MISTAKES = [
    ("event id >= V", _at("event_type", 2, 3, 12), ["'event_type'", "holds 12", "row 2", "[0, 12)"]),
    ("negative delta_t", _at("delta_t", 1, 0, -2.5), ["'delta_t'", "-2.5", "row 1", ">= 0"]),
    ("NaN amount", _at("amount", 0, 4, np.nan), ["'amount'", "nan", "row 0", "finite"]),
    ("length > T", _with("length", lambda x: np.array([5, 6, 1])), ["'length'", "6", "row 1"]),
    ("FP64 amount", _with("amount", lambda x: x["amount"].astype(np.float64)), ["amount", "FP32"]),
]


def _wire_inputs(protocol: str, inputs: Inputs) -> list:
    """tritonclient inputs; per-row [B] tensors go as [B, 1], as the config declares them."""
    tensors = []
    for name, array in inputs.items():
        array = np.ascontiguousarray(array.reshape(-1, 1) if array.ndim == 1 else array)
        tensor = CLIENTS[protocol].InferInput(
            name, list(array.shape), np_to_triton_dtype(array.dtype)
        )
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _refusal(url: str, protocol: str, model: str, inputs: Inputs) -> InferenceServerException:
    """The server's error for ``inputs`` (fails the test if the request succeeds)."""
    client = CLIENTS[protocol].InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, _wire_inputs(protocol, inputs))
    finally:
        client.close()
    return error.value


def _url(server: EmbeddedTriton, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    ("corrupt", "words"), [c[1:] for c in CLIENT_MISTAKES], ids=[c[0] for c in CLIENT_MISTAKES]
)
def test_client_mistake_is_400_naming_input_row_and_expectation(
    triton_server, standin, rng, protocol, corrupt, words
):
    good = standin.random_inputs(rng, batch=3, seq=5, lengths=[5, 2, 4])

    error = _refusal(_url(triton_server, protocol), protocol, standin.model_name, corrupt(good))

    assert error.status() == STATUS[protocol][400]
    for word in words:
        assert word.lower() in error.message().lower(), f"{word!r} not in {error.message()!r}"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_batch_over_max_batch_size_is_400(triton_server, standin, rng, protocol):
    inputs = standin.random_inputs(rng, batch=65, seq=2)  # max_batch_size is 64

    error = _refusal(_url(triton_server, protocol), protocol, standin.model_name, inputs)

    assert error.status() == STATUS[protocol][400]
    assert "batch-size must be <= 64" in error.message()


def export_faulty(path: Path) -> Path:
    """A graph inconsistent with its contract: model.py accepts event ids < 12, but the graph
    gathers them from a 4-row table, so onnxruntime fails on ids 4..11."""
    table = helper.make_tensor(
        "table",
        TensorProto.FLOAT,
        [FAULTY_TABLE_ROWS, FAULTY_VOCAB],
        np.full(FAULTY_TABLE_ROWS * FAULTY_VOCAB, 1 / FAULTY_VOCAB, np.float32),
    )
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "event_type"], ["rows"]),
            helper.make_node("ReduceMean", ["rows"], ["next_event_probs"], axes=[1], keepdims=0),
        ],
        "faulty",
        [helper.make_tensor_value_info("event_type", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("next_event_probs", TensorProto.FLOAT, ["batch", 12])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    repo = tmp_path_factory.mktemp("faulty_repository")
    onnx_path = export_faulty(tmp_path_factory.mktemp("faulty") / "faulty.onnx")
    write_model_version(repo, FAULTY_MODEL, onnx_path, FAULTY_METADATA, max_batch_size=8)
    with EmbeddedTriton(repo, startup_timeout_s=90) as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_fault_on_the_server_side_is_500_and_spares_the_next_request(faulty_server, protocol):
    url = _url(faulty_server, protocol)

    error = _refusal(url, protocol, FAULTY_MODEL, {"event_type": np.array([[1, 7, 2]])})

    assert error.status() == STATUS[protocol][500]
    assert "onnxruntime failed on this request" in error.message()
    client = CLIENTS[protocol].InferenceServerClient(url)
    try:
        good = {"event_type": np.array([[1, 3, 2], [0, 0, 1]])}
        result = client.infer(FAULTY_MODEL, _wire_inputs(protocol, good))
        np.testing.assert_allclose(result.as_numpy("next_event_probs"), 1 / FAULTY_VOCAB)
        assert client.is_server_ready()
    finally:
        client.close()


def test_budget_below_max_len_is_refused_at_load(standin_onnx, standin):
    with pytest.raises(ValueError, match=r"max_batch_elements=100 is smaller than .*max_len=256"):
        OnnxModel(standin_onnx, {FEATURISER_KEY: {"max_len": 256}}, max_batch_elements=100)
    with pytest.raises(ValueError, match=r"max_batch_elements=0: expected >= 1"):
        OnnxModel(standin_onnx, standin.metadata, max_batch_elements=0)


def test_config_parameter_reads_integers_and_names_a_bad_one():
    config = {"parameters": {"max_batch_elements": {"string_value": "4096"}}}

    assert config_parameter(config, "max_batch_elements", 7) == 4096
    assert config_parameter({}, "max_batch_elements", 7) == 7
    bad = {"parameters": {"max_batch_elements": {"string_value": "4k"}}}
    with pytest.raises(ValueError, match=r"'max_batch_elements' is '4k'; expected an integer"):
        config_parameter(bad, "max_batch_elements", 7)
