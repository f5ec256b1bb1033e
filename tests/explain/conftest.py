"""Tiny twins with random weights and events with a numeric and a categorical field, and their
explanation model written into a repository (no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.data.features import FeaturiserSpec, Scaling, Vocab
from fintwin.explain.serving import explain_files, write_explain_model
from fintwin.models.module import TwinModule
from tests.conftest import make_events

TYPES = ("card", "salary", "transfer")
CHANNELS = ("branch", "online")
SCALING = {"amount_mean": 3.0, "amount_std": 1.0, "delta_t_mean": 1.5, "delta_t_std": 1.0,
           "gap_log_mean": 1.0, "gap_log_std": 1.0, "numeric_mean": [100.0],
           "numeric_std": [50.0]}
ENCODERS = {
    "lstm": {"name": "lstm", "hidden_size": 16, "num_layers": 2, "dropout": 0.0,
             "type_recency": True, "history_summary": True},
    "transformer": {"name": "transformer", "hidden_size": 16, "num_layers": 2, "num_heads": 2,
                    "ff_mult": 2, "dropout": 0.0, "time_features": 8, "type_recency": True,
                    "history_summary": True},
}
MODEL = "twin"


def random_twin(encoder: str, seed: int = 0) -> tuple[TwinModule, FeaturiserSpec]:
    """A twin with random weights over ``TYPES``, a numeric ``balance`` and a categorical
    ``channel``, and its featuriser spec."""
    torch.manual_seed(seed)
    vocab, channels = Vocab.fit(np.array(TYPES)), Vocab.fit(np.array(CHANNELS))
    model = TwinModule(encoder=ENCODERS[encoder], vocab_size=vocab.size, scaling=SCALING,
                       horizon_days=30.0, n_numeric=1, n_components=2,
                       categorical_sizes=[channels.size]).eval()
    spec = FeaturiserSpec(vocab, max_len=32, horizon_days=30.0, scaling=Scaling.from_dict(SCALING),
                          numeric_features=("balance",), categorical_features=("channel",),
                          categorical_vocabs=(channels,))
    return model, spec


def extra_columns(events: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``events`` with a ``balance`` and a ``channel`` per event."""
    rng = np.random.default_rng(seed)
    return events.assign(balance=rng.normal(100.0, 50.0, len(events)).round(2),
                         channel=rng.choice(CHANNELS, len(events)))


@pytest.fixture
def rich_events() -> pd.DataFrame:
    """Eight customers' events with the extra fields; customer ``long`` has 40 events, more
    than ``max_len``."""
    rng = np.random.default_rng(8)
    times = pd.Timestamp("2024-01-01") + pd.to_timedelta(np.sort(rng.uniform(0, 200, 40)), unit="D")
    long = pd.DataFrame({"customer_id": "long", "timestamp": times,
                         "event_type": rng.choice(TYPES, 40), "amount": rng.lognormal(3, 1, 40)})
    return extra_columns(pd.concat([make_events(n_customers=7, seed=4), long], ignore_index=True))


def write_explain_repo(directory: Path) -> Path:
    """A repository in ``directory`` holding only the explanation model of an LSTM
    ``random_twin``."""
    model, spec = random_twin("lstm")
    repo, scratch = directory / "repo", directory / "scratch"
    scratch.mkdir(parents=True)
    metadata = {"featuriser": spec.to_dict(), "quantiles": [0.1, 0.5, 0.9], "encoder": "lstm"}
    write_explain_model(repo, MODEL, spec, metadata, explain_files(model, scratch))
    return repo


@pytest.fixture
def explain_repo(tmp_path: Path) -> Path:
    return write_explain_repo(tmp_path)
