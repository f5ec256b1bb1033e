"""Holdout actuals, forecast metrics and weekly tracking on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fintwin.twin.evaluation import (
    METRIC_KEYS,
    decile_mape,
    forecast_metrics,
    holdout_actuals,
    normalized_gini,
    week_ends,
    weekly_tracking,
)

CUTOFF, HOLDOUT_END = "2024-01-31", "2024-03-31"


def events(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    customer_id, timestamp, amount = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "customer_id": list(customer_id),
            "timestamp": pd.to_datetime(list(timestamp)),
            "event_type": "purchase",
            "amount": list(amount),
        }
    )


@pytest.fixture
def split_events() -> pd.DataFrame:
    return events(
        [
            ("a", "2024-01-01 09:00", 5.0),
            ("a", "2024-01-31 23:00", 1.0),  # on the cutoff day: calibration
            ("a", "2024-02-10 10:00", 2.0),  # same day as the next: one transaction of 5.0
            ("a", "2024-02-10 18:30", 3.0),
            ("a", "2024-03-31 12:00", 4.0),  # on holdout_end: holdout
            ("a", "2024-04-01 00:00", 100.0),  # after the holdout
            ("b", "2024-01-15 00:00", 7.0),  # no holdout transaction: zeros
            ("c", "2024-02-01 08:00", 9.0),  # first purchase after the cutoff: not in the cohort
        ]
    )


def test_holdout_actuals_merge_same_day_and_keep_zero_rows(split_events: pd.DataFrame) -> None:
    actual = holdout_actuals(split_events, CUTOFF, HOLDOUT_END)
    assert list(actual.index) == ["a", "b"]
    assert actual.loc["a"].to_dict() == {"txn": 2, "spend": 9.0}
    assert actual.loc["b"].to_dict() == {"txn": 0, "spend": 0.0}
    assert actual["txn"].dtype == np.int64


def test_split_boundaries_must_be_dates(split_events: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="cutoff must be a date without a time of day"):
        holdout_actuals(split_events, "2024-01-31 12:00", HOLDOUT_END)
    with pytest.raises(ValueError, match="must be after cutoff"):
        holdout_actuals(split_events, HOLDOUT_END, CUTOFF)


def hand_made_forecast() -> tuple[pd.DataFrame, pd.DataFrame]:
    index = pd.Index(["c1", "c2", "c3", "c4"], name="customer_id")
    pred = pd.DataFrame(
        {
            "pred_txn": [1.0, 0.0, 2.0, 1.0],
            "pred_spend": [10.0, 0.0, 30.0, 5.0],
            "p_any": [0.8, 0.1, 0.6, 0.7],
        },
        index=index,
    )
    actual = pd.DataFrame({"txn": [2, 0, 1, 0], "spend": [20.0, 0.0, 10.0, 0.0]}, index=index)
    return pred, actual


def test_forecast_metrics_hand_computed() -> None:
    pred, actual = hand_made_forecast()
    metrics = forecast_metrics(pred.iloc[::-1], actual)  # row order does not matter
    assert tuple(metrics) == METRIC_KEYS
    expected = {
        "txn_mae": 0.75,  # errors -1, 0, 1, 1
        "txn_rmse": math.sqrt(3 / 4),
        "txn_total_pct_err": 100 * (4 - 3) / 3,
        "spend_mae": 8.75,  # errors -10, 0, 20, 5
        "spend_rmse": math.sqrt(525 / 4),
        "spend_total_pct_err": 50.0,
        "auroc_any": 0.75,  # positives 0.8, 0.6 vs negatives 0.1, 0.7: 3 of 4 pairs right
        # by prediction, actual spend 10, 20, 0, 0: cumulative shares 1/3, 1, 1, 1, trapezoid
        # area 5/6 - 1/8, Gini 5/12; perfect order 20, 10, 0, 0: 2/3, 1, 1, 1, Gini 7/12
        "spend_gini": 5 / 7,
        # 4 customers: 4 bins of one, ascending prediction 0, 5, 10, 30 vs actual 0, 0, 20, 10;
        # bins with actual spend: |10 - 20| / 20 and |30 - 10| / 10
        "spend_decile_mape": 1.25,
    }
    assert metrics == pytest.approx(expected)


def test_forecast_metrics_reject_mismatched_inputs() -> None:
    pred, actual = hand_made_forecast()
    with pytest.raises(ValueError, match="1 without a prediction"):
        forecast_metrics(pred.iloc[1:], actual)
    with pytest.raises(ValueError, match=r"predictions lacks columns \['p_any'\]"):
        forecast_metrics(pred.drop(columns="p_any"), actual)


def test_normalized_gini() -> None:
    actual = np.array([0.0, 3.0, 0.0, 10.0, 1.0, 0.0])
    assert normalized_gini(np.sqrt(actual) + 1, actual) == pytest.approx(1.0)
    assert normalized_gini(-actual, actual) < -0.5
    # ties count as a random order in expectation, so a constant forecast scores 0
    assert normalized_gini(np.full(6, 2.0), actual) == pytest.approx(0.0)
    assert math.isnan(normalized_gini(actual, np.zeros(6)))


def test_decile_mape() -> None:
    pred = np.arange(1.0, 21.0)  # deciles of two: {1, 2}, {3, 4}, ..., {19, 20}
    assert decile_mape(pred, pred) == 0.0
    actual = pred.copy()
    actual[18:] *= 2  # top decile: predicted 39, actual 78
    assert decile_mape(pred[::-1], actual[::-1]) == pytest.approx(0.5 / 10)
    perfect_with_zeros = np.r_[np.zeros(10), np.arange(1.0, 11.0)]
    assert decile_mape(perfect_with_zeros, perfect_with_zeros) == 0.0


def test_week_ends_for_cdnow() -> None:
    grid = week_ends("1997-01-01", "1998-06-30")
    assert len(grid) == 78
    assert grid[38] == pd.Timestamp("1997-09-30")
    assert grid[-1] == pd.Timestamp("1998-06-30")
    short = week_ends("2024-01-01", "2024-01-10")
    assert list(short) == list(pd.to_datetime(["2024-01-07", "2024-01-10"]))


def test_weekly_tracking_counts_cohort_repeats_and_anchors_holdout_curves(
    split_events: pd.DataFrame,
) -> None:
    grid = week_ends("2024-01-01", HOLDOUT_END)
    model = pd.Series(np.arange(len(grid), dtype=float), index=grid)
    holdout_grid = grid[grid > pd.Timestamp(CUTOFF)]
    twin = pd.Series(0.5, index=holdout_grid)
    tracking = weekly_tracking(split_events, CUTOFF, HOLDOUT_END, {"model": model}, {"twin": twin})
    assert list(tracking.columns) == ["actual", "model", "twin"]
    assert tracking.index.equals(grid)
    # repeats of the cohort: a on 01-31, 02-10 (merged) and 03-31; b and c add none
    assert tracking.loc["2024-01-28", "actual"] == 0
    assert tracking.loc["2024-02-04", "actual"] == 1
    assert tracking.loc["2024-02-11", "actual"] == 2
    assert tracking["actual"].iloc[-1] == 3
    assert tracking["twin"].isna().sum() == len(grid) - len(holdout_grid)
    assert (tracking.loc[holdout_grid, "twin"] == 1.5).all()  # 0.5 + 1 repeat by the cutoff
    with pytest.raises(ValueError, match="on or before the cutoff"):
        weekly_tracking(split_events, CUTOFF, HOLDOUT_END, holdout_cumulative={"twin": model})
