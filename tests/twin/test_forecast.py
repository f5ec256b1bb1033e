"""Holdout forecasts from rollouts and from the direct heads, and the weekly curves."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from fintwin.twin.evaluation import weekly_tracking
from fintwin.twin.forecast import (
    heads_cumulative,
    heads_forecast,
    holdout_week_ends,
    rollout_cumulative,
    rollout_distribution,
    rollout_forecast,
)
from fintwin.twin.rollout import RolloutConfig, rollout
from fintwin.twin.scores import rank_bounds, sample_pmf
from tests.twin.conftest import (
    CUTOFF,
    HORIZON_DAYS,
    SPEC,
    VOCAB,
    KnownHeads,
    build_twin,
    fix_heads,
    history_events,
)

HOLDOUT_END = "2024-05-31"  # 61 days after the cut-off


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return history_events([0.5, 10.0, 40.0], n_events=5)


def test_heads_forecast_scales_the_horizon_to_the_holdout(events: pd.DataFrame) -> None:
    heads = KnownHeads(count=2.0, spend=50.0, churn=0.25)
    model = fix_heads(build_twin("transformer"), heads)
    forecast = heads_forecast(model, SPEC.sequences(events, CUTOFF), HOLDOUT_END, HORIZON_DAYS)
    ratio = 61 / 30
    np.testing.assert_allclose(forecast["pred_txn"], 2.0 * ratio, rtol=1e-5)
    np.testing.assert_allclose(forecast["pred_spend"], 50.0 * ratio, rtol=1e-5)
    np.testing.assert_allclose(forecast["p_any"], 1 - 0.25**ratio, rtol=1e-5)
    assert forecast.index.tolist() == ["c0", "c1", "c2"]


def test_heads_forecast_conditions_on_the_silence(events: pd.DataFrame) -> None:
    """The horizon head gets each customer's silence before the cut-off (0.5, 10 and 40
    days, clamped to the longest silence of training); P(any) is weighted by P(alive) =
    (1 - p) S(c) / (p + (1 - p) S(c))."""
    heads = KnownHeads(gap_median=5.0, gap_sigma=0.5, p_dormant=0.2, count=2.0, churn=0.25)
    model = fix_heads(build_twin("lstm"), heads)
    model.horizon_head.max_elapsed.fill_(20.0)
    seen: list[torch.Tensor] = []
    model.horizon_head.register_forward_hook(
        lambda module, args, output: seen.append(module.elapsed_features(args[1]))
    )
    forecast = heads_forecast(model, SPEC.sequences(events, CUTOFF), HOLDOUT_END, HORIZON_DAYS)
    silence = torch.tensor([0.5, 10.0, 20.0])
    expected = torch.stack([torch.log1p(silence), silence / HORIZON_DAYS], dim=-1)
    torch.testing.assert_close(seen[-1], expected, atol=1e-3, rtol=1e-4)
    survival = stats.lognorm.sf([0.5, 10.0, 40.0], s=0.5, scale=5.0)
    p_alive = 0.8 * survival / (0.2 + 0.8 * survival)
    ratio = 61 / 30
    np.testing.assert_allclose(forecast["pred_txn"], 2.0 * ratio, rtol=1e-5)
    np.testing.assert_allclose(forecast["p_any"], p_alive * (1 - 0.25**ratio), rtol=2e-3)


def test_rollout_forecast_and_its_weekly_curve(events: pd.DataFrame) -> None:
    model = fix_heads(build_twin(), KnownHeads(gap_median=3.0, gap_sigma=1.0, p_dormant=0.2))
    result = rollout(
        model, SPEC.sequences(events, CUTOFF), VOCAB, HOLDOUT_END, RolloutConfig(samples=100)
    )
    forecast = rollout_forecast(result)
    summary = result.summary
    assert forecast["pred_txn"].equals(summary["expected_transactions"])
    assert forecast["pred_spend"].equals(summary["expected_spend"])
    assert forecast["p_any"].equals(summary["p_active"])

    days = holdout_week_ends(events, CUTOFF, HOLDOUT_END)
    curve = rollout_cumulative(result, days)
    assert curve.index.equals(days) and days[-1] == pd.Timestamp(HOLDOUT_END)
    assert (np.diff(curve.to_numpy()) >= 0).all()
    assert curve.iloc[-1] == pytest.approx(summary["expected_transactions"].sum())
    first_week = result.daily_transactions.loc[: days[0]].sum()
    assert curve.iloc[0] == pytest.approx(first_week)

    tracking = weekly_tracking(events, CUTOFF, HOLDOUT_END, holdout_cumulative={"twin": curve})
    after = tracking.index > pd.Timestamp(CUTOFF)
    assert tracking.loc[after, "twin"].notna().all()
    assert tracking.loc[~after, "twin"].isna().all()


def test_rollout_distribution_pools_the_paths_in_the_actuals_order(events: pd.DataFrame) -> None:
    model = fix_heads(build_twin(), KnownHeads(gap_median=3.0, gap_sigma=1.0, p_dormant=0.2))
    sequences = SPEC.sequences(events, CUTOFF)
    config = RolloutConfig(samples=40, keep_outcomes=True)
    results = [
        rollout(model, sequences, VOCAB, HOLDOUT_END, replace(config, seed=seed))
        for seed in (0, 1)
    ]
    ids = results[0].summary.index[::-1]
    actual = pd.DataFrame({"txn": np.arange(len(ids)), "spend": 10.0 * np.arange(len(ids))}, ids)
    distribution = rollout_distribution(results, actual)
    paths = np.concatenate([r.path_transactions for r in results], axis=1)[::-1]
    np.testing.assert_allclose(distribution.txn_pmf, sample_pmf(paths))
    np.testing.assert_array_equal(distribution.txn, actual["txn"])
    spend = np.concatenate([r.path_spend for r in results], axis=1)[::-1]
    lower, upper = rank_bounds(spend, actual["spend"].to_numpy())
    np.testing.assert_array_equal(distribution.spend_lower, lower)
    np.testing.assert_array_equal(distribution.spend_upper, upper)
    unkept = rollout(model, sequences, VOCAB, HOLDOUT_END, RolloutConfig(samples=2))
    with pytest.raises(ValueError, match="kept no path outcomes"):
        rollout_distribution([unkept], actual)


def test_heads_curve_spreads_the_total_evenly() -> None:
    forecast = pd.DataFrame({"pred_txn": [4.0, 2.0, 0.1]})
    days = pd.DatetimeIndex(["2024-03-31", "2024-04-07", "2024-05-01", "2024-05-31"])
    curve = heads_cumulative(forecast, CUTOFF, HOLDOUT_END, days)
    assert curve.index.equals(days[1:])
    np.testing.assert_allclose(curve.to_numpy(), 6.1 * np.array([7, 31, 61]) / 61)
