"""Tiny twins for rollout, what-if, forecast and pipeline tests.

``fix_heads`` turns a twin into a model with known output distributions: the final linear
layers of the heads get zero weights and chosen biases, so every customer at every step has
the same log-normal gap, dormancy probability, type and amount distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.data.features import OOV_ID, FeaturiserSpec, Vocab
from fintwin.models.module import TwinModule

TYPES = ("card", "salary", "transfer")
VOCAB = Vocab(TYPES)
SCALING = {
    "amount_mean": 3.0,
    "amount_std": 1.0,
    "delta_t_mean": 1.5,
    "delta_t_std": 1.0,
    "numeric_mean": [],
    "numeric_std": [],
}
HORIZON_DAYS = 30.0
CUTOFF = "2024-03-31"
START = pd.Timestamp("2024-04-01")  # end of the cut-off day
TINY_ENCODERS = {
    "lstm": {"name": "lstm", "hidden_size": 8, "num_layers": 1, "dropout": 0.0},
    "transformer": {
        "name": "transformer",
        "hidden_size": 8,
        "num_layers": 2,
        "num_heads": 2,
        "ff_mult": 2,
        "dropout": 0.0,
        "time_features": 4,
    },
}
SPEC = FeaturiserSpec(vocab=VOCAB, horizon_days=HORIZON_DAYS, max_len=64)


def build_twin(
    encoder: str = "lstm", seed: int = 0, n_components: int = 2, n_numeric: int = 0
) -> TwinModule:
    """A randomly initialised tiny twin in eval mode."""
    torch.manual_seed(seed)
    scaling = SCALING | {"numeric_mean": [1.0] * n_numeric, "numeric_std": [2.0] * n_numeric}
    model = TwinModule(
        dict(TINY_ENCODERS[encoder]),
        vocab_size=VOCAB.size,
        scaling=scaling,
        horizon_days=HORIZON_DAYS,
        n_components=n_components,
        n_numeric=n_numeric,
    )
    return model.eval()


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p)) if p > 0 else -40.0


@dataclass(frozen=True)
class KnownHeads:
    """Distributions a fixed twin outputs whatever the history."""

    gap_median: float = 5.0
    gap_sigma: float = 0.5
    p_dormant: float = 0.0
    amount_median: float = 20.0
    amount_sigma: float = 0.5
    count: float = 2.0
    spend: float = 50.0
    churn: float = 0.25

    @property
    def amount_mean(self) -> float:
        return self.amount_median * math.exp(0.5 * self.amount_sigma**2)


@torch.no_grad()
def fix_heads(model: TwinModule, heads: KnownHeads) -> TwinModule:
    """Make every head output ``heads`` regardless of the hidden state.

    Known types are equally likely; the out-of-vocabulary id almost never comes up.
    """
    for head in (model.type_head, model.time_head, model.amount_head, model.churn_head):
        head.linear.weight.zero_()
        head.linear.bias.zero_()
    model.type_head.linear.bias[OOV_ID] = -40.0  # a trained twin rarely predicts OOV
    model.horizon_head.net[-1].weight.zero_()
    m = model.time_head.n_components
    bias = model.time_head.linear.bias
    bias[m : 2 * m] = math.log(heads.gap_median) - model.time_head.loc_offset
    bias[2 * m : 3 * m] = math.log(heads.gap_sigma)
    bias[3 * m] = _logit(heads.p_dormant)
    v = model.amount_head.vocab_size
    amount = model.amount_head.linear.bias
    amount[:v] = -40.0  # never a zero amount
    amount[v : 2 * v] = math.log(heads.amount_median) - model.amount_head.loc_offset
    amount[2 * v :] = math.log(heads.amount_sigma)
    model.churn_head.linear.bias.fill_(_logit(heads.churn))
    model.horizon_head.net[-1].bias.copy_(
        torch.tensor(
            [math.log(heads.count), math.log(heads.spend) - model.horizon_head.log_spend_unit]
        )
    )
    return model


def history_events(elapsed_days: list[float], n_events: int = 3, gap: float = 7.0) -> pd.DataFrame:
    """One customer per entry (``c0``, ``c1``, ...), the last event ``elapsed`` days before START."""
    rows = []
    for i, elapsed in enumerate(elapsed_days):
        last = START - pd.Timedelta(days=elapsed)
        for k in range(n_events):
            rows.append(
                {
                    "customer_id": f"c{i}",
                    "timestamp": last - pd.Timedelta(days=gap * (n_events - 1 - k)),
                    "event_type": TYPES[k % len(TYPES)],
                    "amount": 10.0 + k,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def known_heads() -> KnownHeads:
    return KnownHeads()


def window_days(horizon_end: str) -> float:
    """Days from START to the end of the ``horizon_end`` day."""
    return float((pd.Timestamp(horizon_end) + pd.Timedelta(days=1) - START).days)


def renewal_counts(
    rng: np.random.Generator,
    n: int,
    elapsed: float,
    window: float,
    median: float,
    sigma: float,
    p_dormant: float = 0.0,
) -> np.ndarray:
    """Events in ``[0, window)`` of a log-normal renewal process with dormancy after each event.

    The last event was ``elapsed`` days before 0 with nothing since: the first gap is drawn
    given it exceeds ``elapsed`` and dormancy is updated by Bayes' rule.
    """
    from scipy.stats import norm

    mu = math.log(median)
    tail = norm.sf((math.log(elapsed) - mu) / sigma)
    p_first_dormant = p_dormant / (p_dormant + (1 - p_dormant) * tail)
    z = norm.isf(rng.uniform(size=n) * tail)
    time = np.exp(mu + sigma * z) - elapsed
    alive = rng.uniform(size=n) >= p_first_dormant
    counts = np.zeros(n, np.int64)
    alive &= time < window
    while alive.any():
        counts += alive
        alive &= rng.uniform(size=n) >= p_dormant
        time = time + np.exp(mu + sigma * rng.standard_normal(n))
        alive &= time < window
    return counts
