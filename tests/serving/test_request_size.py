"""Request size: sequences longer than the model's max_len and requests over the
max_batch_elements budget are refused alike in process and served; batched requests are split
into runs within the budget; TwinClient truncates histories and sizes its batches to fit."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from fintwin.serving.client import InvalidRequestError, TritonTransport, TwinClient
from fintwin.serving.python_model import CONTRACT_KEY, OnnxModel


@pytest.fixture(params=["grpc", "http"])
def served(request, triton_server, standin) -> Iterator[TritonTransport]:
    url = triton_server.grpc_url if request.param == "grpc" else triton_server.http_url
    client = TritonTransport(url, request.param, standin.model_name)
    yield client
    client.close()


def _refusal(scorer, inputs) -> str:
    with pytest.raises(InvalidRequestError) as error:
        scorer.infer(inputs)
    return str(error.value)


def test_sequence_longer_than_max_len_is_refused_alike(served, reference, standin, rng):
    inputs = standin.random_inputs(rng, batch=2, seq=standin.max_len + 1)

    message = _refusal(reference, inputs)

    assert message == (
        "input 'event_type' has T=257 events per row, more than this model's max_len=256; "
        "send each customer's most recent 256 events (truncate from the left, as TwinClient does)"
    )
    assert message in _refusal(served, inputs)


def test_request_over_the_budget_is_refused_alike(served, reference, standin, rng):
    inputs = standin.random_inputs(rng, batch=64, seq=200)  # within max_batch_size and max_len

    message = _refusal(reference, inputs)

    assert message == (
        "input 'event_type' has shape [64, 200] = 12800 elements, more than this model's budget "
        "of 8192 (rows x events, config parameter 'max_batch_elements'); send at most 40 rows "
        "of this length per request"
    )
    assert message in _refusal(served, inputs)


def test_request_at_both_limits_is_served(served, reference, standin, rng):
    rows = standin.max_batch_elements // standin.max_len  # 32 x 256 = the whole budget
    inputs = standin.random_inputs(rng, batch=rows, seq=standin.max_len)

    standin.assert_outputs_equal(served.infer(inputs), reference.infer(inputs))


class _RecordingSession:
    """Wraps an onnxruntime session and records the batch shape of every run."""

    def __init__(self, session) -> None:
        self.session, self.shapes = session, []

    def run(self, output_names, feed):
        self.shapes.append(feed["event_type"].shape)
        return self.session.run(output_names, feed)


def test_batched_requests_are_split_into_runs_within_the_budget(standin_onnx, standin, rng):
    no_max_len = {CONTRACT_KEY: standin.metadata[CONTRACT_KEY]}
    model = OnnxModel(standin_onnx, no_max_len, max_batch_elements=40)
    requests = [
        standin.random_inputs(rng, batch=b, seq=t) for b, t in [(2, 10), (2, 6), (1, 20), (3, 4)]
    ]
    expected = [model.run(request) for request in requests]
    model.runtime = _RecordingSession(model.runtime)

    results = model.run_many(requests)

    # (2 + 2) rows x 10 = 40 fits; 5 rows x 20 would not, nor would (1 + 3) rows x 20
    assert model.runtime.shapes == [(4, 10), (1, 20), (3, 4)]
    for result, want in zip(results, expected, strict=True):
        standin.assert_outputs_equal(result, want)


def _events(n_customers: int, long_history: int) -> pd.DataFrame:
    """Customer c000 has ``long_history`` events, the others 1-6, all of the stand-in's types."""
    rng = np.random.default_rng(5)
    rows = []
    for customer in range(n_customers):
        n = long_history if customer == 0 else int(rng.integers(1, 7))
        times = pd.Timestamp("2024-01-01") + pd.to_timedelta(
            np.sort(rng.uniform(0, 400, n)), unit="D"
        )
        rows.append(
            pd.DataFrame(
                {
                    "customer_id": f"c{customer:03d}",
                    "timestamp": times,
                    "event_type": rng.choice([f"type_{i}" for i in range(2, 12)], n),
                    "amount": np.round(rng.lognormal(3, 1, n), 2),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_twin_client_truncates_long_histories_and_fits_the_budget(
    triton_server, model_repo, standin
):
    """40 customers, one with 300 events: each keeps its last 256, a call holds at most
    8192 // 256 = 32 customers, and the served answers equal the in-process ones."""
    events = _events(40, long_history=300)
    local = TwinClient(repo=model_repo, model=standin.model_name)
    try:
        sequences = local.featurise(events)
        expected = local.predict(events)
    finally:
        local.close()
    assert sequences.lengths[0] == standin.max_len and sequences.lengths[1:].max() <= 6

    for protocol, url in (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)):
        client = TwinClient(url, protocol, standin.model_name)
        try:
            served = client.predict(events)
        finally:
            client.close()
        assert list(served["customer_id"]) == [f"c{c:03d}" for c in range(40)]
        pd.testing.assert_frame_equal(served, expected, check_exact=False, atol=1e-5, rtol=0)
