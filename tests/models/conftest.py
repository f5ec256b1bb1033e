"""Tiny random batches that follow the model batch contract (right padding; targets at t
describe event t + 1), tiny twins, and the encoder parametrisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from fintwin.models.module import TwinModule

VOCAB_SIZE = 7
HORIZON_DAYS = 30.0
SCALING = {
    "amount_mean": 3.0,
    "amount_std": 1.2,
    "delta_t_mean": 2.0,
    "delta_t_std": 1.0,
    "numeric_mean": [0.5, -1.0],
    "numeric_std": [2.0, 0.5],
    "events_per_customer": 4.0,
    "time_terms_per_customer": 5.0,
    "churn_terms_per_customer": 3.0,
    "horizon_terms_per_customer": 2.5,
}
TINY_ENCODERS = {
    "lstm": {
        "name": "lstm",
        "hidden_size": 16,
        "num_layers": 2,
        "dropout": 0.0,
        "type_recency": True,
        "history_summary": True,
    },
    "transformer": {
        "name": "transformer",
        "hidden_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "ff_mult": 2,
        "dropout": 0.0,
        "time_features": 8,
        "type_recency": True,
        "history_summary": True,
    },
}

BatchFactory = Callable[..., dict[str, torch.Tensor]]


def _targets(
    times: np.ndarray, amounts: np.ndarray, end_time: float, horizon: float
) -> dict[str, np.ndarray]:
    """Per-position targets of one customer (real positions only), per the contract."""
    n = len(times)
    next_gap = np.append(np.diff(times), end_time - times[-1])
    next_amount = np.append(amounts[1:], 0.0)
    observed = np.arange(n) < n - 1
    churn_label = (next_gap > horizon).astype(np.float32)
    churn_mask = observed | (next_gap >= horizon)
    return {
        "next_gap": next_gap,
        "next_amount": next_amount,
        "gap_censored": ~observed,
        "churn_label": churn_label,
        "churn_mask": churn_mask,
        "horizon_mask": times + horizon <= end_time,
    }


def build_batch(
    lengths: Sequence[int],
    max_len: int | None = None,
    n_numeric: int = 0,
    seed: int = 0,
    event_types: np.ndarray | None = None,
    gaps: np.ndarray | None = None,
    categorical_sizes: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """A right-padded batch with inputs and targets consistent with each other.

    ``event_types`` / ``gaps`` (``[B, max(lengths)]``) override the random draws;
    ``categorical_sizes`` adds ``categorical`` ids (drawn after everything else, so the other
    inputs do not depend on it).
    """
    rng = np.random.default_rng(seed)
    batch_size, longest = len(lengths), max(lengths)
    max_len = max_len or longest
    types = (
        event_types
        if event_types is not None
        else rng.integers(2, VOCAB_SIZE, (batch_size, longest))
    )
    gap_draws = gaps if gaps is not None else rng.exponential(5.0, (batch_size, longest)) + 0.01
    amounts = np.where(
        rng.random((batch_size, longest)) < 0.2, 0.0, rng.lognormal(3, 1, (batch_size, longest))
    )
    numeric = rng.normal(size=(batch_size, longest, n_numeric))
    int_keys = ("event_type", "day_of_week", "day_of_month", "hour", "next_type")
    float_keys = (
        "amount",
        "delta_t",
        "next_gap",
        "next_amount",
        "churn_label",
    )
    bool_keys = ("gap_censored", "churn_mask", "horizon_mask")
    out = {key: np.zeros((batch_size, max_len), np.int64) for key in int_keys}
    out |= {key: np.zeros((batch_size, max_len), np.float32) for key in float_keys}
    out |= {key: np.zeros((batch_size, max_len), bool) for key in bool_keys}
    out["numeric"] = np.zeros((batch_size, max_len, n_numeric), np.float32)
    for b, n in enumerate(lengths):
        delta_t = np.append(0.0, gap_draws[b, 1:n])
        times = np.cumsum(delta_t)
        end_time = times[-1] + rng.exponential(20.0)
        real = slice(0, n)
        out["event_type"][b, real] = types[b, :n]
        out["next_type"][b, : n - 1] = types[b, 1:n]
        out["amount"][b, real] = amounts[b, :n]
        out["delta_t"][b, real] = delta_t
        out["day_of_week"][b, real] = rng.integers(0, 7, n)
        out["day_of_month"][b, real] = rng.integers(1, 32, n)
        out["hour"][b, real] = rng.integers(0, 24, n)
        out["numeric"][b, real] = numeric[b, :n]
        for key, values in _targets(times, amounts[b, :n], end_time, HORIZON_DAYS).items():
            out[key][b, real] = values
    batch = {key: torch.from_numpy(value) for key, value in out.items()}
    batch["length"] = torch.tensor(list(lengths), dtype=torch.int64)
    if n_numeric == 0:
        del batch["numeric"]
    if categorical_sizes:
        ids = rng.integers(1, np.asarray(categorical_sizes), (batch_size, longest, len(categorical_sizes)))
        real = np.arange(longest)[None, :] < np.asarray(lengths)[:, None]
        categorical = np.zeros((batch_size, max_len, len(categorical_sizes)), np.int64)
        categorical[:, :longest] = np.where(real[..., None], ids, 0)
        batch["categorical"] = torch.from_numpy(categorical)
    return batch


@pytest.fixture
def make_batch() -> BatchFactory:
    """Factory for contract batches: ``make_batch(lengths, max_len=None, n_numeric=0, ...)``."""
    return build_batch


def build_module(
    encoder: dict[str, object], n_numeric: int = 0, seed: int = 0, **kwargs: object
) -> TwinModule:
    """A tiny ``TwinModule`` in eval mode with the test vocabulary and scaling."""
    torch.manual_seed(seed)
    module = TwinModule(
        encoder=encoder,
        vocab_size=VOCAB_SIZE,
        scaling=SCALING,
        horizon_days=HORIZON_DAYS,
        n_numeric=n_numeric,
        **kwargs,
    )
    return module.eval()


@pytest.fixture
def make_module() -> Callable[..., TwinModule]:
    """Factory: ``make_module(encoder_config, n_numeric=0, seed=0, **TwinModule kwargs)``."""
    return build_module


@pytest.fixture(params=sorted(TINY_ENCODERS))
def encoder_config(request: pytest.FixtureRequest) -> dict[str, object]:
    """Tiny architecture config of each encoder (parametrised: lstm, transformer)."""
    return dict(TINY_ENCODERS[request.param])


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread is faster and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
