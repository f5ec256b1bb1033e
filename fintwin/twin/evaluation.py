"""Forecast evaluation on a calibration / holdout split.

Conventions, shared with `fintwin.twin.baselines` (those of Fader, Hardie and Lee 2005 and of
`lifetimes`):
- Every event counts as a transaction (filter the table first to count only some event types).
  Events of one customer on the same calendar day are merged into one transaction (amounts
  summed); a transaction happens at the start of its day.
- `cutoff` is the LAST day of the calibration period and `holdout_end` the last day of the
  holdout, both inclusive and both dates (midnight). CDNOW: cutoff 1997-09-30, holdout_end
  1998-06-30, a holdout of (holdout_end - cutoff) = 39 weeks.
- The cohort is every customer with a transaction on or before `cutoff`; a repeat transaction is
  any transaction after a customer's first one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.stats import rankdata

METRIC_KEYS = (
    "txn_mae",
    "txn_rmse",
    "txn_total_pct_err",
    "spend_mae",
    "spend_rmse",
    "spend_total_pct_err",
    "auroc_any",
    "spend_gini",
    "spend_decile_mape",
)
PREDICTION_COLUMNS = ("pred_txn", "pred_spend", "p_any")
ACTUAL_COLUMNS = ("txn", "spend")
WEEK = pd.Timedelta(days=7)


def as_day(value: str | pd.Timestamp, name: str) -> pd.Timestamp:
    """Parse `value` as a calendar day (a naive timestamp at midnight).

    Raises ValueError when it carries a time of day or a time zone, since the split boundaries
    are whole days (see the module docstring).
    """
    day = pd.Timestamp(value)
    if day.tzinfo is not None:
        raise ValueError(f"{name} must be a naive date (UTC), got {value!r} with a time zone")
    if day != day.normalize():
        raise ValueError(f"{name} must be a date without a time of day, got {value!r}")
    return day


def split_days(
    cutoff: str | pd.Timestamp, holdout_end: str | pd.Timestamp
) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Parse and check the split boundaries: both dates, `cutoff` before `holdout_end`."""
    cut, end = as_day(cutoff, "cutoff"), as_day(holdout_end, "holdout_end")
    if end <= cut:
        raise ValueError(f"holdout_end ({end.date()}) must be after cutoff ({cut.date()})")
    return cut, end


def daily_transactions(events: pd.DataFrame) -> pd.DataFrame:
    """Merge each customer's same-day events into one transaction.

    Returns columns `customer_id`, `day` (datetime64, midnight) and `amount` (summed), sorted by
    (customer_id, day).
    """
    days = events["timestamp"].dt.normalize().rename("day")
    merged = events.groupby([events["customer_id"], days], sort=True)["amount"].sum()
    return merged.reset_index()


def cohort_transactions(events: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Daily transactions of the customers whose first transaction is on or before `cutoff`.

    Adds columns `first_day` (the customer's first transaction day) and `repeat` (False for that
    first transaction).
    """
    daily = daily_transactions(events)
    daily["first_day"] = daily.groupby("customer_id")["day"].transform("min")
    cohort = daily[daily["first_day"] <= cutoff].reset_index(drop=True)
    return cohort.assign(repeat=cohort["day"] > cohort["first_day"])


def holdout_actuals(
    events: pd.DataFrame, cutoff: str | pd.Timestamp, holdout_end: str | pd.Timestamp
) -> pd.DataFrame:
    """Actual transactions and spend of each cohort customer in (cutoff, holdout_end].

    Returns a DataFrame indexed by `customer_id` (every cohort customer, zeros for those without a
    holdout transaction) with columns `txn` (int64, merged same-day transactions) and `spend`.
    """
    cut, end = split_days(cutoff, holdout_end)
    cohort = cohort_transactions(events, cut)
    customers = pd.Index(cohort["customer_id"].unique(), name="customer_id")
    holdout = cohort[(cohort["day"] > cut) & (cohort["day"] <= end)]
    grouped = holdout.groupby("customer_id")["amount"]
    actual = pd.DataFrame({"txn": grouped.size(), "spend": grouped.sum()})
    actual = actual.reindex(customers, fill_value=0)
    return actual.astype({"txn": "int64", "spend": "float64"})


def mean_absolute_error(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(pred - actual)))


def root_mean_squared_error(pred: np.ndarray, actual: np.ndarray) -> float:
    """Root mean squared error."""
    return float(np.sqrt(np.mean((pred - actual) ** 2)))


def total_pct_error(pred: np.ndarray, actual: np.ndarray) -> float:
    """Error of the predicted total in percent of the actual total (NaN when that is 0)."""
    total = actual.sum()
    return float(100.0 * (pred.sum() - total) / total) if total != 0 else float("nan")


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney) formula, ties counted as one half.

    NaN when `label` holds a single class.
    """
    label = np.asarray(label, dtype=bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _gini_of_ranking(score: np.ndarray, value: np.ndarray) -> float:
    """Raw Gini of `value` ranked by `score` (highest first): 2 * area under the gain curve - 1.

    The gain curve is the cumulative share of value against the share of customers taken; its
    area is integrated by trapezoids, so a random ranking scores 0 in expectation (the ZILN
    code's `2 * mean(cumulative share) - 1` is higher by 1/n). Customers with tied scores are
    taken in random order, in expectation: within a tie group the cumulative value grows
    linearly, so ties neither help nor hurt a model.
    """
    order = np.argsort(-score, kind="stable")
    score, value = score[order], value[order]
    starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])
    sizes = np.diff(np.r_[starts, len(score)])
    group_sum = np.add.reduceat(value, starts)
    group = np.repeat(np.arange(len(starts)), sizes)
    position = np.arange(len(score)) - starts[group] + 1
    before_group = np.cumsum(group_sum) - group_sum
    cumulative = before_group[group] + position / sizes[group] * group_sum[group]
    area = cumulative.mean() / value.sum() - 0.5 / len(value)
    return float(2.0 * area - 1.0)


def normalized_gini(pred: np.ndarray, actual: np.ndarray) -> float:
    """Normalised Gini of `pred` as a ranking of `actual` (Wang, Liu, Miao 2019).

    The model's Gini (from the cumulative share of actual value captured when customers are taken
    in decreasing order of prediction) divided by the Gini of the perfect ranking: 1 for a perfect
    ranking, about 0 for a random one. NaN when the actual total is not positive.
    """
    pred, actual = np.asarray(pred, dtype=float), np.asarray(actual, dtype=float)
    if actual.sum() <= 0:
        return float("nan")
    return _gini_of_ranking(pred, actual) / _gini_of_ranking(actual, actual)


def decile_table(pred: pd.Series, actual: pd.Series, n_bins: int = 10) -> pd.DataFrame:
    """Group customers into `n_bins` equal-size bins by predicted value, lowest first.

    Ties are split by input order, so every bin holds n // n_bins or n // n_bins + 1 customers.
    Returns one row per bin (index `decile`, 1-based) with `n`, `pred_sum`, `actual_sum`,
    `pred_mean` and `actual_mean`.
    """
    pred = pd.Series(np.asarray(pred, dtype=float))
    actual = pd.Series(np.asarray(actual, dtype=float))
    n_bins = min(n_bins, len(pred))
    rank = pred.rank(method="first").to_numpy() - 1
    decile = pd.Series((rank * n_bins // len(pred)).astype(int) + 1, name="decile")
    grouped = pd.DataFrame({"pred": pred, "actual": actual}).groupby(decile)
    table = grouped.agg(
        n=("pred", "size"),
        pred_sum=("pred", "sum"),
        actual_sum=("actual", "sum"),
        pred_mean=("pred", "mean"),
        actual_mean=("actual", "mean"),
    )
    return table


def decile_mape(pred: np.ndarray, actual: np.ndarray, n_bins: int = 10) -> float:
    """Decile-level MAPE (Wang, Liu, Miao 2019), as a fraction (0.25 means 25%).

    Mean over prediction deciles of |sum predicted - sum actual| / sum actual. Deciles whose actual
    sum is 0 have no defined percentage error and are left out; NaN when all are.
    """
    table = decile_table(pred, actual, n_bins)
    table = table[table["actual_sum"] > 0]
    if table.empty:
        return float("nan")
    ape = (table["pred_sum"] - table["actual_sum"]).abs() / table["actual_sum"]
    return float(ape.mean())


def _check_columns(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; it has {list(frame.columns)}")


def align_predictions(pred: pd.DataFrame, actual: pd.DataFrame) -> pd.DataFrame:
    """Return `pred` in the row order of `actual`; both must index the same customers."""
    missing = actual.index.difference(pred.index)
    extra = pred.index.difference(actual.index)
    if len(missing) or len(extra):
        raise ValueError(
            f"predictions and actuals cover different customers: {len(missing)} without a "
            f"prediction (e.g. {list(missing[:3])}), {len(extra)} not in the cohort "
            f"(e.g. {list(extra[:3])})"
        )
    return pred.loc[actual.index]


def forecast_metrics(pred: pd.DataFrame, actual: pd.DataFrame) -> dict[str, float]:
    """Compare per-customer holdout forecasts with actuals.

    `pred` has columns `pred_txn`, `pred_spend` and `p_any` (P(at least one transaction in the
    holdout)); `actual` is `holdout_actuals` output (`txn`, `spend`); both are indexed by
    customer_id over the same customers. Returns the keys of `METRIC_KEYS`: MAE, RMSE and error of
    the total in percent for transactions and spend, the AUROC of `p_any` for "any holdout
    transaction", the normalised Gini of predicted spend and the spend decile MAPE (a fraction).
    """
    _check_columns(pred, PREDICTION_COLUMNS, "predictions")
    _check_columns(actual, ACTUAL_COLUMNS, "actuals")
    pred = align_predictions(pred, actual)
    p_txn, a_txn = pred["pred_txn"].to_numpy(float), actual["txn"].to_numpy(float)
    p_spend, a_spend = pred["pred_spend"].to_numpy(float), actual["spend"].to_numpy(float)
    return {
        "txn_mae": mean_absolute_error(p_txn, a_txn),
        "txn_rmse": root_mean_squared_error(p_txn, a_txn),
        "txn_total_pct_err": total_pct_error(p_txn, a_txn),
        "spend_mae": mean_absolute_error(p_spend, a_spend),
        "spend_rmse": root_mean_squared_error(p_spend, a_spend),
        "spend_total_pct_err": total_pct_error(p_spend, a_spend),
        "auroc_any": auroc(pred["p_any"].to_numpy(float), a_txn > 0),
        "spend_gini": normalized_gini(p_spend, a_spend),
        "spend_decile_mape": decile_mape(p_spend, a_spend),
    }


def week_ends(start: str | pd.Timestamp, holdout_end: str | pd.Timestamp) -> pd.DatetimeIndex:
    """Last day of each week from `start` through `holdout_end` (a short last week ends there).

    Week k covers days start + 7(k-1) .. start + 7k - 1. CDNOW (start 1997-01-01): week 39 ends
    on 1997-09-30 and week 78 on 1998-06-30.
    """
    first, end = split_days(start, holdout_end)
    ends = pd.date_range(first + WEEK - pd.Timedelta(days=1), end, freq="7D")
    if len(ends) == 0 or ends[-1] != end:
        ends = ends.append(pd.DatetimeIndex([end]))
    return ends.rename("week_end")


def weekly_tracking(
    events: pd.DataFrame,
    cutoff: str | pd.Timestamp,
    holdout_end: str | pd.Timestamp,
    expected_cumulative: Mapping[str, pd.Series] | None = None,
    holdout_cumulative: Mapping[str, pd.Series] | None = None,
) -> pd.DataFrame:
    """Cumulative repeat transactions of the cohort per week, actual and expected by each model.

    The week grid is `week_ends(first cohort day, holdout_end)`. Model curves are Series indexed
    by week-end days (any subset of the grid; weeks left out stay NaN):
    - `expected_cumulative[name]`: expected cumulative repeat transactions since the start of the
      grid, e.g. from each customer's first purchase as in Fader, Hardie, Lee (2005), Figure 2;
    - `holdout_cumulative[name]`: expected cumulative transactions after `cutoff` only (a forecast
      from the cutoff, e.g. twin rollouts); the actual cumulative count at `cutoff` is added.
    Returns a DataFrame indexed by `week_end` with column `actual` and one column per model.
    """
    cut, end = split_days(cutoff, holdout_end)
    cohort = cohort_transactions(events, cut)
    grid = week_ends(cohort["day"].min(), end)
    repeat_days = cohort.loc[cohort["repeat"] & (cohort["day"] <= end), "day"].sort_values()
    actual = np.searchsorted(repeat_days.to_numpy(), grid.to_numpy(), side="right")
    tracking = pd.DataFrame({"actual": actual.astype(float)}, index=grid)
    actual_at_cutoff = float(np.searchsorted(repeat_days.to_numpy(), cut.to_datetime64(), "right"))
    curves = {name: s.astype(float) for name, s in (expected_cumulative or {}).items()}
    for name, series in (holdout_cumulative or {}).items():
        if (series.index <= cut).any():
            raise ValueError(f"holdout curve {name!r} has weeks ending on or before the cutoff")
        if name in curves:
            raise ValueError(f"model {name!r} given both as expected and as holdout curve")
        curves[name] = series.astype(float) + actual_at_cutoff
    for name, series in curves.items():
        if name == "actual":
            raise ValueError("'actual' is reserved for the observed curve; rename the model")
        tracking[name] = series.reindex(grid)
    return tracking
