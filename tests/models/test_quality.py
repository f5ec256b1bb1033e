"""Plain next-gap baselines, checked against the raw event table by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fintwin.data.datamodule import EventDataModule
from fintwin.data.sequences import fit_population_gaps, training_gaps
from fintwin.models.quality import gap_baselines

NS_PER_DAY = 86_400e9


def test_gap_baselines_match_a_hand_computation(events):
    dm = EventDataModule(events=events, cutoff="2024-05-31", horizon_days=30, max_len=64,
                         batch_size=8, val_fraction=0.2, test_fraction=0.3, seed=3)
    dm.setup()
    mu, sigma, _ = fit_population_gaps(*training_gaps(dm.sequences, dm.splits["train"]))
    pop_mean = np.exp(mu + sigma**2 / 2)
    own_errors, pop_errors = [], []
    for customer in dm.sequences.customer_ids[dm.splits["test"]]:
        times = events.loc[(events["customer_id"] == customer)
                           & (events["timestamp"] < pd.Timestamp("2024-06-01")), "timestamp"]
        gaps = np.diff(np.sort(times.to_numpy()).astype(np.int64)) / NS_PER_DAY
        for i, next_gap in enumerate(gaps):
            own_mean = gaps[:i].mean() if i > 0 else pop_mean
            own_errors.append(abs(own_mean - next_gap))
            pop_errors.append(abs(np.exp(mu) - next_gap))
    assert len(own_errors) > 20
    baselines = gap_baselines(dm)
    assert baselines["test/baseline_own_mean_time_mae"] == pytest.approx(np.mean(own_errors), rel=1e-4)
    assert baselines["test/baseline_population_time_mae"] == pytest.approx(np.mean(pop_errors), rel=1e-4)
