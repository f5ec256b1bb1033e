"""BG/NBD + Gamma-Gamma baseline (Fader, Hardie, Lee 2005; Fader, Hardie 2013) via `lifetimes`.

The split conventions (same-day merging, inclusive `cutoff` and `holdout_end` days) are those of
`fintwin.twin.evaluation`; time is measured in weeks, as in the paper.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from lifetimes import BetaGeoFitter, GammaGammaFitter

from fintwin.twin.evaluation import WEEK, as_day, cohort_transactions, split_days

log = logging.getLogger(__name__)


def rfm_summary(events: pd.DataFrame, cutoff: str | pd.Timestamp) -> pd.DataFrame:
    """Per-customer calibration summary in the `lifetimes` convention, time in weeks.

    Over the merged daily transactions on or before `cutoff`, indexed by customer_id:
    `frequency` (number of repeat transactions), `recency` (first to last transaction), `T`
    (first transaction to `cutoff`), `monetary_value` (mean value of the repeat transactions, 0
    without any) and `first_day` (the first transaction day).
    """
    cut = as_day(cutoff, "cutoff")
    calibration = cohort_transactions(events, cut)
    calibration = calibration[calibration["day"] <= cut]
    days = calibration.groupby("customer_id")["day"]
    first, last = days.min(), days.max()
    repeats = calibration[calibration["repeat"]].groupby("customer_id")["amount"].mean()
    return pd.DataFrame(
        {
            "frequency": days.size() - 1,
            "recency": (last - first) / WEEK,
            "T": (cut - first) / WEEK,
            "monetary_value": repeats.reindex(first.index, fill_value=0.0),
            "first_day": first,
        }
    )


def bgnbd_p_any(
    fitter: BetaGeoFitter,
    horizon: float,
    frequency: np.ndarray,
    recency: np.ndarray,
    T: np.ndarray,
) -> np.ndarray:
    """P(at least one transaction within `horizon` after T | frequency, recency, T) under BG/NBD.

    A customer alive at T with purchase rate lambda makes none in the next t with probability
    exp(-lambda t) (dropping out happens only right after a purchase), and given alive, lambda ~
    Gamma(r + x, alpha + T). So P(X(t) = 0) = 1 - P(alive) + P(alive) ((alpha + T) /
    (alpha + T + t))^(r + x).
    """
    r, alpha = fitter.params_["r"], fitter.params_["alpha"]
    p_alive = fitter.conditional_probability_alive(frequency, recency, T)
    none_if_alive = ((alpha + T) / (alpha + T + horizon)) ** (r + frequency)
    return p_alive * (1.0 - none_if_alive)


class BGNBDGammaGamma:
    """BG/NBD for transaction counts and Gamma-Gamma for transaction values.

    BG/NBD is fitted on every cohort customer, Gamma-Gamma on those with at least one repeat
    transaction of positive mean value. `params` holds the fitted r, alpha, a, b (alpha in weeks)
    and p, q, v.
    """

    def __init__(self, bgnbd_penalizer: float = 0.0, gg_penalizer: float = 0.0) -> None:
        self.bgnbd_penalizer = bgnbd_penalizer
        self.gg_penalizer = gg_penalizer

    def fit(self, events: pd.DataFrame, cutoff: str | pd.Timestamp) -> BGNBDGammaGamma:
        """Fit both models on the events on or before `cutoff` (later events are ignored)."""
        self.cutoff_ = as_day(cutoff, "cutoff")
        self.summary_ = rfm_summary(events, self.cutoff_)
        s = self.summary_
        self.bgnbd_ = BetaGeoFitter(penalizer_coef=self.bgnbd_penalizer)
        self.bgnbd_.fit(s["frequency"], s["recency"], s["T"])
        repeaters = s[(s["frequency"] > 0) & (s["monetary_value"] > 0)]
        self.gamma_gamma_ = GammaGammaFitter(penalizer_coef=self.gg_penalizer)
        self.gamma_gamma_.fit(repeaters["frequency"], repeaters["monetary_value"])
        log.info(
            "BG/NBD + Gamma-Gamma on %d customers (%d repeaters): %s",
            len(s),
            len(repeaters),
            {k: round(v, 4) for k, v in self.params.items()},
        )
        return self

    @property
    def params(self) -> dict[str, float]:
        """Fitted parameters: BG/NBD r, alpha, a, b and Gamma-Gamma p, q, v."""
        fitted = pd.concat([self.bgnbd_.params_, self.gamma_gamma_.params_])
        return {name: float(value) for name, value in fitted.items()}

    def _rfm_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.summary_
        return (
            s["frequency"].to_numpy(float),
            s["recency"].to_numpy(float),
            s["T"].to_numpy(float),
        )

    def predict(self, holdout_end: str | pd.Timestamp) -> pd.DataFrame:
        """Per-customer forecasts for the holdout (cutoff, holdout_end].

        Returns a DataFrame indexed by customer_id with `pred_txn` (expected transactions),
        `pred_spend` (`pred_txn` times the Gamma-Gamma conditional expected transaction value),
        `p_alive` (at the cutoff) and `p_any` (P(at least one transaction in the holdout)).
        """
        cut, end = split_days(self.cutoff_, holdout_end)
        horizon = (end - cut) / WEEK
        x, t_x, big_t = self._rfm_arrays()
        pred_txn = self.bgnbd_.conditional_expected_number_of_purchases_up_to_time(
            horizon, x, t_x, big_t
        )
        value = self.gamma_gamma_.conditional_expected_average_profit(
            x, self.summary_["monetary_value"].to_numpy(float)
        )
        return pd.DataFrame(
            {
                "pred_txn": pred_txn,
                "pred_spend": pred_txn * value,
                "p_alive": self.bgnbd_.conditional_probability_alive(x, t_x, big_t),
                "p_any": bgnbd_p_any(self.bgnbd_, horizon, x, t_x, big_t),
            },
            index=self.summary_.index,
        )

    def expected_cumulative_repeats(self, week_ends: pd.DatetimeIndex) -> pd.Series:
        """Expected cumulative repeat transactions of the cohort through each week-end day.

        Each customer contributes the unconditional BG/NBD expectation E[X(t)] for t weeks since
        their first purchase (Fader, Hardie, Lee 2005, Figure 2). For `weekly_tracking`'s
        `expected_cumulative`.
        """
        births = self.summary_["first_day"].value_counts()
        ages = (week_ends.to_numpy()[:, None] - births.index.to_numpy()[None, :]) / WEEK
        expected = self.bgnbd_.expected_number_of_purchases_up_to_time(np.clip(ages, 0.0, None))
        return pd.Series(expected @ births.to_numpy(float), index=week_ends)

    def expected_cumulative_holdout(self, week_ends: pd.DatetimeIndex) -> pd.Series:
        """Expected cumulative transactions after the cutoff through each later week-end day.

        Sum over customers of the conditional BG/NBD expectation given the calibration history;
        for `weekly_tracking`'s `holdout_cumulative`.
        """
        after = week_ends[week_ends > self.cutoff_]
        horizons = ((after - self.cutoff_) / WEEK).to_numpy(float)[:, None]
        x, t_x, big_t = self._rfm_arrays()
        expected = self.bgnbd_.conditional_expected_number_of_purchases_up_to_time(
            horizons, x[None, :], t_x[None, :], big_t[None, :]
        )
        return pd.Series(expected.sum(axis=1), index=after)
