"""Bad requests get a clear per-request error, in process and through Triton, and break nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from fintwin.monitor.metrics import ModelMetrics, PrometheusSink
from fintwin.serving import python_model
from fintwin.serving.client import InferenceError, InvalidRequestError, TritonTransport
from fintwin.serving.python_model import InputError, OnnxModel

Inputs = dict[str, np.ndarray]


def _set(name: str, value: Callable[[Inputs], np.ndarray]) -> Callable[[Inputs], Inputs]:
    return lambda inputs: {**inputs, name: value(inputs)}


def _poison(name: str, row: int, position: int, value: float) -> Callable[[Inputs], Inputs]:
    def corrupt(inputs: Inputs) -> Inputs:
        array = inputs[name].copy()
        array[row, position] = value
        return {**inputs, name: array}

    return corrupt


# (case id, corruption of a valid batch B=3 T=5 lengths [5, 2, 4], words the error must hold)
BAD_REQUESTS = [
    ("dtype", _set("amount", lambda x: x["amount"].astype(np.float64)), ["amount", "FP64", "FP32"]),
    (
        "rank",
        _set("event_type", lambda x: x["event_type"][:, 0]),
        ["event_type", "shape", "expected"],
    ),
    ("length>T", _set("length", lambda x: np.array([5, 9, 4])), ["length", "9", "[1, 5]"]),
    (
        "negative length",
        _set("length", lambda x: np.array([5, -2, 4])),
        ["length", "-2", "[1, 5]"],
    ),
    ("zero length", _set("length", lambda x: np.array([0, 2, 4])), ["length", "[1, 5]"]),
    ("NaN amount", _poison("amount", 1, 1, np.nan), ["amount", "NaN", "row 1"]),
    ("inf delta_t", _poison("delta_t", 2, 0, np.inf), ["delta_t", "inf", "row 2"]),
    ("negative delta_t", _poison("delta_t", 0, 2, -1.5), ["delta_t", "-1.5", "row 0", ">= 0"]),
    (
        "negative silence",
        _set("days_since_last_event", lambda x: np.array([1.0, -3.0, 2.0], np.float32)),
        ["days_since_last_event", "-3.0", "row 1", ">= 0"],
    ),
    ("event id >= V", _poison("event_type", 0, 3, 12), ["event_type", "holds 12", "[0, 12)"]),
    ("negative event id", _poison("event_type", 2, 1, -1), ["event_type", "holds -1", "[0, 12)"]),
    ("hour out of range", _poison("hour", 0, 0, 24), ["hour", "holds 24", "[0, 24)"]),
    ("batch mismatch", _set("length", lambda x: x["length"][:2]), ["input '", "batch size"]),
    ("sequence mismatch", _set("amount", lambda x: x["amount"][:, :4]), ["amount", "seq", "5"]),
]


@pytest.fixture(params=["in-process", "grpc", "http"])
def scorer(request, reference, triton_server, standin) -> Iterator:
    if request.param == "in-process":
        yield reference
        return
    url = triton_server.grpc_url if request.param == "grpc" else triton_server.http_url
    client = TritonTransport(url, request.param, standin.model_name)
    yield client
    client.close()


@pytest.mark.parametrize(
    ("corrupt", "words"), [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_gets_clear_error_and_next_request_succeeds(
    scorer, reference, standin, rng, corrupt, words
):
    good = standin.random_inputs(rng, batch=3, seq=5, lengths=[5, 2, 4])

    with pytest.raises(InvalidRequestError) as error:  # 400 / INVALID_ARGUMENT when served
        scorer.infer(corrupt(good))

    message = str(error.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    standin.assert_outputs_equal(scorer.infer(good), reference.infer(good))


def test_unknown_input_name_is_named(reference, standin, rng):
    inputs = {**standin.random_inputs(rng, batch=2, seq=3), "amounts": np.zeros((2, 3), np.float32)}
    with pytest.raises(InferenceError, match=r"unexpected \['amounts'\]"):
        reference.infer(inputs)


def test_bad_request_in_a_batch_fails_alone(standin_onnx, standin, rng):
    model = OnnxModel(standin_onnx, standin.metadata)
    good = [standin.random_inputs(rng, batch=b, seq=t) for b, t in [(2, 4), (1, 9)]]
    bad = _poison("event_type", 0, 0, standin.vocab_size)(good[0])

    results = model.run_many([good[0], bad, good[1]])

    assert isinstance(results[1], InputError) and "event_type" in str(results[1])
    standin.assert_outputs_equal(results[0], model.run(good[0]))
    standin.assert_outputs_equal(results[2], model.run(good[1]))


def test_onnxruntime_failure_is_isolated_to_its_request(standin_onnx, standin, rng):
    """A request that passes validation but breaks onnxruntime (vocab bound off) fails alone."""
    model = OnnxModel(standin_onnx, standin.metadata)
    good = standin.random_inputs(rng, batch=2, seq=4)
    breaking = _poison("event_type", 1, 0, 1000)(good)
    model.bounds["event_type"] = replace(model.bounds["event_type"], high=None)

    results = model.run_many([good, breaking, good])

    assert isinstance(results[1], RuntimeError) and "onnxruntime failed" in str(results[1])
    standin.assert_outputs_equal(results[0], model.run(good))
    standin.assert_outputs_equal(results[2], model.run(good))


class _FakeBackend:
    """Just enough of triton_python_backend_utils to call TritonPythonModel.execute."""

    class TritonError(Exception):
        """Stands in for pb_utils.TritonError(message, code=INTERNAL)."""

        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str = "INTERNAL") -> None:
            super().__init__(message)
            self.code = code

    class Tensor(SimpleNamespace):
        def __init__(self, name: str, array: np.ndarray) -> None:
            super().__init__(name=name, array=array)

    class InferenceResponse(SimpleNamespace):
        def __init__(self, output_tensors, error=None) -> None:
            super().__init__(output_tensors=output_tensors, error=error)


class _FakeRequest:
    def __init__(self, inputs: Inputs) -> None:
        self._tensors = [
            SimpleNamespace(name=lambda n=name: n, as_numpy=lambda a=array: a)
            for name, array in inputs.items()
        ]

    def inputs(self) -> list:
        return self._tensors


def test_execute_answers_every_request_even_when_the_model_raises(
    monkeypatch, standin_onnx, standin, rng
):
    monkeypatch.setattr(python_model, "pb_utils", _FakeBackend)
    triton_model = python_model.TritonPythonModel()
    triton_model.model = OnnxModel(standin_onnx, standin.metadata)
    sink = PrometheusSink()
    triton_model.metrics = ModelMetrics(sink, "standin", 1)
    good = standin.random_inputs(rng, batch=2, seq=3)
    bad = {**good, "length": np.array([0, 1])}

    responses = triton_model.execute([_FakeRequest(good), _FakeRequest(bad)])
    requests = sink.registry.get_sample_value
    assert requests("fintwin_requests_total", {"model": "standin", "version": "1",
                                               "outcome": "invalid"}) == 1

    assert responses[1].error is not None and "length" in str(responses[1].error)
    assert responses[1].error.code == "INVALID_ARG"  # the client's fault: HTTP 400
    assert responses[0].error is None
    assert [t.name for t in responses[0].output_tensors] == list(standin.output_names)

    def explode(_requests):
        raise MemoryError("boom")

    monkeypatch.setattr(triton_model.model, "run_many", explode)
    responses = triton_model.execute([_FakeRequest(good), _FakeRequest(good)])
    assert [str(r.error) for r in responses] == ["internal error: boom"] * 2
    assert [r.error.code for r in responses] == ["INTERNAL"] * 2  # ours: HTTP 500
