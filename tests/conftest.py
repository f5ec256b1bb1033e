"""Shared fixtures: tiny event tables made in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def make_events(n_customers: int = 30, seed: int = 0, start: str = "2024-01-01",
                days: int = 200) -> pd.DataFrame:
    """A small random event table: 1-25 events per customer, three event types."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_customers):
        n = int(rng.integers(1, 26))
        times = pd.Timestamp(start) + pd.to_timedelta(np.sort(rng.uniform(0, days, n)), unit="D")
        types = rng.choice(["card", "salary", "transfer"], size=n, p=[0.6, 0.2, 0.2])
        amounts = np.round(rng.lognormal(3, 1, n), 2)
        rows.append(pd.DataFrame({"customer_id": f"c{c:03d}", "timestamp": times,
                                  "event_type": types, "amount": amounts}))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture
def events() -> pd.DataFrame:
    """Thirty customers over 200 days from 2024-01-01."""
    return make_events()


@pytest.fixture(scope="session")
def events_csv(tmp_path_factory) -> str:
    """Sixty customers of events as a CSV file."""
    path = tmp_path_factory.mktemp("data") / "events.csv"
    make_events(n_customers=60, seed=1).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, events_csv) -> Path:
    """A tiny LSTM twin trained for two epochs through train.py's code path."""
    from fintwin.training import run
    from tests.test_train import compose_cfg, tiny_overrides

    out = tmp_path_factory.mktemp("run")
    run(compose_cfg(out, tiny_overrides(events_csv, "lstm")))
    return out / "checkpoints" / "last.ckpt"
