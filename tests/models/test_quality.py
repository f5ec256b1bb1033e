"""Plain next-gap baselines and gap calibration, checked by hand and against scipy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from fintwin.data.datamodule import CustomerSplit, EventDataModule
from fintwin.data.features import NS_PER_DAY
from fintwin.data.sequences import fit_population_gaps, training_gaps
from fintwin.models.heads import GapDistribution
from fintwin.models.quality import gap_baselines, gap_calibration


@pytest.fixture
def datamodule(events) -> EventDataModule:
    dm = EventDataModule(events=events, cutoff="2024-05-31", horizon_days=30, max_len=64,
                         batch_size=8, split=CustomerSplit(val=0.2, test=0.3, seed=3), seed=3)
    dm.setup()
    return dm


def test_gap_baselines_match_a_hand_computation(events, datamodule):
    dm = datamodule
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


class LogNormalGaps(torch.nn.Module):
    """A stand-in twin whose gap given a return is LogNormal(log 10, 1) at every position."""

    device = torch.device("cpu")

    def forward(self, batch: dict) -> torch.Tensor:
        return torch.zeros(batch["event_type"].shape)

    def head_outputs(self, hidden: torch.Tensor) -> SimpleNamespace:
        ones = torch.ones(*hidden.shape, 1)
        return SimpleNamespace(gap=GapDistribution(
            log_weights=ones * 0.0, loc=ones * np.log(10.0), log_scale=ones * 0.0,
            dormant_logit=torch.zeros(hidden.shape)))


def test_gap_calibration_is_the_pit_of_observed_gaps(datamodule):
    batch = datamodule.sequences.batch(datamodule.splits["test"])
    valid = torch.arange(batch["event_type"].shape[1])[None] < batch["length"][:, None]
    gaps = batch["next_gap"][valid & ~batch["gap_censored"]].double().numpy()
    pit = stats.lognorm.cdf(gaps, s=1.0, scale=10.0)
    calibration = gap_calibration(LogNormalGaps(), datamodule)
    assert calibration["test/time_pit_below_median"] == pytest.approx((gaps < 10.0).mean())
    assert calibration["test/time_pit_ks"] == pytest.approx(
        stats.kstest(pit, "uniform").statistic, abs=1e-6)
