"""Shared fixtures: tiny event tables made in code."""

from __future__ import annotations

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
