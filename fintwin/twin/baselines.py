"""BG/NBD + Gamma-Gamma baseline (Fader, Hardie, Lee 2005; Fader, Hardie 2013) via `lifetimes`.

The split conventions (same-day merging, inclusive `cutoff` and `holdout_end` days) are those of
`fintwin.twin.evaluation`; time is measured in weeks, as in the paper.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from lifetimes import BetaGeoFitter, GammaGammaFitter
from scipy.special import betainc

from fintwin.twin.evaluation import WEEK, as_day, cohort_transactions, split_days
from fintwin.twin.scores import HoldoutDistribution

PMF_TAIL = 1e-9  # `bgnbd_count_pmf` goes on until every customer's P(X >= N) is below this
PMF_MAX_COUNT = 4096
SPEND_TERM = 1e-13  # `gamma_gamma_spend_cdf` leaves out counts less likely than this

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


def _products(first: np.ndarray, log_ratios: np.ndarray) -> np.ndarray:
    """Rows ``first * cumprod(exp(log_ratios))``, ``first`` in column 0, computed in logs."""
    log_first = np.log(first)[:, None]
    return np.exp(np.column_stack([log_first, log_first + log_ratios.cumsum(axis=1)]))


def _count_pmf_if_alive(
    fitter: BetaGeoFitter, horizon: float, x: np.ndarray, big_t: np.ndarray, n_max: int
) -> np.ndarray:
    """P(X = n | alive at T) for n = 0..n_max - 1, one row per customer (`bgnbd_count_pmf`).

    Each factor goes from n - 1 to n by its ratio (no special function per cell): the negative
    binomial's (r + x + n - 1) / n * t / (alpha + T + t), and E[(1 - p)^(n - 1)] =
    B(a, b + x + n - 1) / B(a, b + x)'s (b + x + n - 2) / (a + b + x + n - 2);
    E[p (1 - p)^(n - 1)] is the latter times a / (a + b + x + n - 1).
    """
    r, alpha, a, b = (fitter.params_[k] for k in ("r", "alpha", "a", "b"))
    n = np.arange(1, n_max)[None, :]
    rate, x = (alpha + big_t)[:, None], x[:, None]
    purchases = _products(
        (rate[:, 0] / (rate[:, 0] + horizon)) ** (r + x[:, 0]),
        np.log((r + x + n - 1) / n * horizon / (rate + horizon)),
    )
    more = np.clip(1.0 - purchases.cumsum(axis=1), 0.0, None)  # P(N(t) > n)
    stay = _products(np.ones(len(x)), np.log((b + x + n - 1) / (a + b + x + n - 1))[:, :-1])
    leave = stay * a / (a + b + x + n - 1)
    return np.column_stack([purchases[:, 0], stay * purchases[:, 1:] + leave * more[:, 1:]])


def bgnbd_count_pmf(
    fitter: BetaGeoFitter,
    horizon: float,
    frequency: np.ndarray,
    recency: np.ndarray,
    T: np.ndarray,
    tail: float = PMF_TAIL,
) -> np.ndarray:
    """P(X(T, T + horizon) = n | frequency, recency, T) under BG/NBD, for n = 0..N; the last
    column holds the tail P(X >= N), with N + 1 the first power of two >= 64 at which every
    customer's tail is below ``tail`` (at most ``PMF_MAX_COUNT``).

    Given alive at T, the purchase rate lambda ~ Gamma(r + x, alpha + T) and the dropout
    probability p ~ Beta(a, b + x), independently (the posterior of the "alive" term of the
    likelihood). The count is min(N(t), D), N(t) ~ Poisson(lambda t) purchases and D ~
    Geometric(p) the purchase after which the customer drops out, so for n >= 1
    P(X = n | alive) = E[(1 - p)^(n-1)] NB(n) + E[p (1 - p)^(n-1)] P(NB > n), with NB the
    negative binomial (r + x, (alpha + T) / (alpha + T + t)) that mixes N(t) over lambda, and
    P(X = 0 | alive) = NB(0). Then P(X = n) = P(alive) P(X = n | alive) + (1 - P(alive))
    1{n = 0}: the conditional PMF of Fader and Hardie's note "Deriving the conditional PMF of
    the BG/NBD model" (2013); its mean is `conditional_expected_number_of_purchases_up_to_time`.
    """
    x, big_t = np.asarray(frequency, float), np.asarray(T, float)
    p_alive = fitter.conditional_probability_alive(x, recency, big_t)[:, None]
    n_max = 64
    while True:
        pmf = p_alive * _count_pmf_if_alive(fitter, horizon, x, big_t, n_max - 1)
        pmf[:, 0] += 1.0 - p_alive[:, 0]
        rest = np.clip(1.0 - pmf.sum(axis=1), 0.0, None)
        if rest.max() < tail or n_max >= PMF_MAX_COUNT:
            return np.column_stack([pmf, rest])
        n_max *= 2


def gamma_gamma_spend_cdf(
    fitter: GammaGammaFitter,
    count_pmf: np.ndarray,
    spend: np.ndarray,
    frequency: np.ndarray,
    monetary_value: np.ndarray,
) -> np.ndarray:
    """P(holdout spend <= ``spend``) under BG/NBD counts and Gamma-Gamma values.

    A customer's transaction values are Gamma(p, nu) with nu ~ Gamma(p x + q, v + x m_x) given
    the calibration (x repeat transactions of mean value m_x), so the sum of n of them is
    (v + x m_x) times a beta-prime(n p, p x + q) variable; the spend CDF mixes these over the
    count PMF (its tail column taken as N), plus the atom P(X = 0) at 0. Counts of probability
    below ``SPEND_TERM`` are left out (an error below N * SPEND_TERM).
    """
    p, q, v = (fitter.params_[k] for k in ("p", "q", "v"))
    x, m = np.asarray(frequency, float), np.asarray(monetary_value, float)
    rows, n = np.nonzero(count_pmf[:, 1:] >= SPEND_TERM)
    n = n + 1
    scaled = np.asarray(spend, float)[rows] / (v + x[rows] * m[rows])
    given_n = betainc(n * p, p * x[rows] + q, scaled / (1.0 + scaled))  # the beta-prime CDF
    terms = np.bincount(rows, count_pmf[rows, n] * given_n, minlength=len(count_pmf))
    return count_pmf[:, 0] + terms


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

    def holdout_distribution(
        self, holdout_end: str | pd.Timestamp, actual: pd.DataFrame
    ) -> HoldoutDistribution:
        """Each customer's predictive distribution of holdout transactions (`bgnbd_count_pmf`)
        and spend (`gamma_gamma_spend_cdf`) with the actuals, rows in the order of ``actual``
        (`holdout_actuals` output, the same customers)."""
        cut, end = split_days(self.cutoff_, holdout_end)
        rows = self.summary_.index.get_indexer(actual.index)
        if len(actual) != len(self.summary_) or (rows < 0).any():
            raise ValueError("actuals and the BG/NBD calibration cover different customers")
        x, t_x, big_t = (values[rows] for values in self._rfm_arrays())
        pmf = bgnbd_count_pmf(self.bgnbd_, (end - cut) / WEEK, x, t_x, big_t)
        spend = actual["spend"].to_numpy(float)
        monetary = self.summary_["monetary_value"].to_numpy(float)[rows]
        at = np.clip(gamma_gamma_spend_cdf(self.gamma_gamma_, pmf, spend, x, monetary), 0.0, 1.0)
        below = np.where(spend > 0, at, 0.0)  # the only atom is no spend
        return HoldoutDistribution(pmf, actual["txn"].to_numpy(), below, at)

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
