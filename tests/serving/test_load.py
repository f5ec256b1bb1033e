"""A bounded load test on loopback: 16 client threads (8 gRPC, 8 HTTP) x 200 requests of 1-8
customers, one in eight of them bad. Every good answer equals onnxruntime in process, every bad
request gets its 400 with the in-process message, nothing is lost, the server stays ready."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import numpy as np

from fintwin.serving.client import InferenceError, InvalidRequestError, TritonTransport

THREADS = 16
REQUESTS_PER_THREAD = 200
BAD_SHARE = 1 / 8
Inputs = dict[str, np.ndarray]


def _at(name: str, row: int, position: int | None, value: float) -> Callable[[Inputs], Inputs]:
    """Set one element of ``name`` (a [B] input when ``position`` is None)."""

    def corrupt(inputs: Inputs) -> Inputs:
        array = inputs[name].copy()
        array[(row,) if position is None else (row, position)] = value
        return {**inputs, name: array}

    return corrupt


def _bad_requests(good: list[Inputs], standin, rng: np.random.Generator) -> list[Inputs]:
    """Value errors model.py catches (Triton checks dtypes and shapes itself)."""
    corruptions = [
        _at("event_type", 0, 0, standin.vocab_size),
        _at("event_type", 0, 0, -1),
        _at("delta_t", 0, 0, -0.5),
        _at("delta_t", 0, 0, np.nan),
        _at("amount", 0, 0, np.inf),
        _at("hour", 0, 0, 24),
        _at("length", 0, None, 0),
        _at("days_since_last_event", 0, None, -1.0),
        lambda inputs: {**inputs, "length": inputs["length"] + inputs["event_type"].shape[1]},
    ]
    bad = [corrupt(good[i]) for i, corrupt in enumerate(corruptions)]
    bad.append(standin.random_inputs(rng, batch=1, seq=standin.max_len + 1))  # T > max_len
    return bad


def _client_thread(
    transport: TritonTransport,
    seed: int,
    requests: list[Inputs],
    expected: list[dict[str, np.ndarray] | str],
    standin,
    outcomes: Counter,
    failures: list[str],
) -> None:
    """Send REQUESTS_PER_THREAD requests drawn from ``requests``; count every outcome in this
    thread's own ``outcomes`` and describe every failure in the shared ``failures``."""
    rng = np.random.default_rng(seed)
    try:
        for _ in range(REQUESTS_PER_THREAD):
            index = int(rng.integers(len(requests)))
            want = expected[index]
            try:
                got = transport.infer(requests[index])
            except InvalidRequestError as exc:
                ok = isinstance(want, str) and want in str(exc)
                outcomes["refused" if ok else "wrong"] += 1
                if not ok:
                    failures.append(f"request {index} ({transport.protocol}): {exc}")
                continue
            except InferenceError as exc:
                outcomes["lost"] += 1
                failures.append(f"request {index} ({transport.protocol}): {exc}")
                continue
            try:
                assert not isinstance(want, str), f"served, expected the error {want!r}"
                standin.assert_outputs_equal(got, want)
                outcomes["answered"] += 1
            except AssertionError as exc:
                outcomes["wrong"] += 1
                failures.append(f"request {index} ({transport.protocol}): {exc}")
    finally:
        transport.close()


def test_load_of_good_and_bad_requests_loses_nothing(triton_server, reference, standin):
    rng = np.random.default_rng(11)
    good = [
        standin.random_inputs(rng, batch=int(rng.integers(1, 9)), seq=int(rng.integers(1, 65)))
        for _ in range(70)
    ]
    bad = _bad_requests(good, standin, rng)
    requests = good + bad  # 70 good, 10 bad: one in eight draws is bad
    assert len(bad) / len(requests) == BAD_SHARE
    expected: list[dict[str, np.ndarray] | str] = [reference.infer(r) for r in good]
    for request in bad:
        try:
            reference.infer(request)
        except InvalidRequestError as exc:
            expected.append(str(exc))
    assert len(expected) == len(requests), "every bad request is refused in process"

    outcomes = [Counter() for _ in range(THREADS)]
    failures: list[str] = []
    threads = [
        threading.Thread(
            target=_client_thread,
            args=(
                TritonTransport(
                    triton_server.grpc_url if i % 2 else triton_server.http_url,
                    "grpc" if i % 2 else "http",
                    standin.model_name,
                    timeout_s=60,
                ),
                i,
                requests,
                expected,
                standin,
                outcomes[i],
                failures,
            ),
        )
        for i in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert not any(thread.is_alive() for thread in threads)
    assert failures[:5] == []
    counts = sum(outcomes, Counter())
    total = THREADS * REQUESTS_PER_THREAD
    assert sum(counts.values()) == counts["answered"] + counts["refused"] == total
    assert counts["refused"] > total * BAD_SHARE / 2  # the bad ones really were sent
    probe = TritonTransport(triton_server.grpc_url, "grpc", standin.model_name)
    try:
        assert triton_server.running and probe.ready()
        standin.assert_outputs_equal(probe.infer(good[0]), expected[0])
    finally:
        probe.close()
