"""BG/NBD + Gamma-Gamma baseline on CDNOW (Fader, Hardie, Lee 2005)."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pandas as pd
import pytest
from lifetimes import BetaGeoFitter, GammaGammaFitter
from scipy.stats import betaprime

from fintwin.twin.baselines import (
    BGNBDGammaGamma,
    bgnbd_count_pmf,
    bgnbd_p_any,
    gamma_gamma_spend_cdf,
    rfm_summary,
)
from fintwin.twin.evaluation import (
    auroc,
    forecast_metrics,
    holdout_actuals,
    week_ends,
    weekly_tracking,
)

CUTOFF, HOLDOUT_END = "1997-09-30", "1998-06-30"
PAPER = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}  # Fader, Hardie, Lee (2005)
DATASETS = importlib.resources.files("lifetimes") / "datasets"


def load_cdnow(name: str) -> pd.DataFrame:
    """Event table from a raw CDNOW file of the lifetimes wheel.

    CDNOW_sample.txt: original id, sample id, yyyymmdd, number of CDs, dollars (no header);
    CDNOW_master.txt: id, yyyymmdd, number of CDs, dollars (one header line).
    """
    sample = name == "CDNOW_sample.txt"
    columns = ["original_id", "customer_id"] if sample else ["customer_id"]
    raw = pd.read_csv(
        DATASETS / name,
        sep=r"\s+",
        header=None,
        skiprows=0 if sample else 1,
        names=[*columns, "date", "cds", "dollars"],
        dtype={"customer_id": str, "date": str},
    )
    return pd.DataFrame(
        {
            "customer_id": raw["customer_id"].str.lstrip("0"),
            "timestamp": pd.to_datetime(raw["date"], format="%Y%m%d"),
            "event_type": "purchase",
            "amount": raw["dollars"].astype(float),
        }
    )


@pytest.fixture(scope="module")
def sample_events() -> pd.DataFrame:
    return load_cdnow("CDNOW_sample.txt")


@pytest.fixture(scope="module")
def sample_model(sample_events: pd.DataFrame) -> BGNBDGammaGamma:
    return BGNBDGammaGamma().fit(sample_events, CUTOFF)


def test_rfm_summary_matches_the_papers_sample_summary(sample_events: pd.DataFrame) -> None:
    published = pd.read_csv(DATASETS / "cdnow_customers_summary_with_transactions.csv")
    published.index = published["ID"].astype(str)
    summary = rfm_summary(sample_events, CUTOFF).loc[published.index]
    assert len(summary) == 2357
    np.testing.assert_array_equal(summary["frequency"], published["x"])
    np.testing.assert_allclose(summary["recency"], published["t_x"], atol=0.006)
    np.testing.assert_allclose(summary["T"], published["T"], atol=0.006)
    np.testing.assert_allclose(summary["monetary_value"], published["zbar"], atol=0.006)


def test_fit_reproduces_published_parameters(sample_model: BGNBDGammaGamma) -> None:
    # BG/NBD: Fader, Hardie, Lee (2005); Gamma-Gamma: Fader, Hardie (2013) note on CDNOW.
    published = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426, "p": 6.25, "q": 3.74}
    for name, value in published.items():
        assert sample_model.params[name] == pytest.approx(value, abs=0.01), name
    assert sample_model.params["v"] == pytest.approx(15.44, abs=0.02)


def simulated_bgnbd_population(
    params: dict[str, float], n: int, k: int, big_t: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` BG/NBD customers' first ``k`` repeat purchase times (inf after dropping out) and
    their frequency and recency in the calibration period ``[0, big_t]``."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(params["r"], 1 / params["alpha"], n)
    p_drop = rng.beta(params["a"], params["b"], n)
    n_repeats = rng.geometric(p_drop)  # repeat purchases made before dropping out
    times = np.cumsum(rng.exponential(1 / rate[:, None], (n, k)), axis=1)
    times[np.arange(k)[None, :] >= n_repeats[:, None]] = np.inf
    x = (times <= big_t).sum(axis=1)
    t_x = np.where(x > 0, times[np.arange(n), np.maximum(x - 1, 0)], 0.0)
    return times, x, t_x


def test_p_any_matches_a_simulated_bgnbd_population() -> None:
    params = {"r": 0.25, "alpha": 4.8, "a": 0.72, "b": 2.16}
    fitter = BetaGeoFitter()
    fitter.params_ = pd.Series(params)
    n, k, big_t, horizon = 200_000, 5, 39.0, 39.0
    times, x, t_x = simulated_bgnbd_population(params, n, k, big_t, seed=7)
    any_in_window = times[np.arange(n), np.minimum(x, k - 1)] <= big_t + horizon
    for frequency in range(3):
        rows = x == frequency
        p_any = bgnbd_p_any(
            fitter, horizon, x[rows].astype(float), t_x[rows], np.full(rows.sum(), big_t)
        )
        assert p_any.mean() == pytest.approx(any_in_window[rows].mean(), abs=0.01), frequency


def paper_fitter() -> BetaGeoFitter:
    fitter = BetaGeoFitter()
    fitter.params_ = pd.Series(PAPER)
    return fitter


def test_count_pmf_of_a_new_customer_is_the_papers_equation_8() -> None:
    """At x = t_x = T = 0 the conditional PMF is the unconditional P(X(t) = n)."""
    fitter = paper_fitter()
    pmf = bgnbd_count_pmf(fitter, 39.0, np.zeros(1), np.zeros(1), np.zeros(1))
    for n in range(10):
        expected = fitter.probability_of_n_purchases_up_to_time(39.0, n)
        assert pmf[0, n] == pytest.approx(expected, rel=1e-9), n


def test_count_pmf_sums_to_one_and_has_the_conditional_mean() -> None:
    fitter = paper_fitter()
    x = np.array([0.0, 1.0, 2.0, 7.0, 25.0, 60.0])
    t_x = np.array([0.0, 30.0, 2.0, 35.0, 38.5, 38.9])
    big_t = np.full(len(x), 39.0)
    pmf = bgnbd_count_pmf(fitter, 39.0, x, t_x, big_t)
    np.testing.assert_allclose(pmf.sum(axis=1), 1.0, atol=1e-12)
    assert pmf[:, -1].max() < 1e-9  # the tail column
    mean = pmf @ np.arange(pmf.shape[1])
    expected = fitter.conditional_expected_number_of_purchases_up_to_time(39.0, x, t_x, big_t)
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    np.testing.assert_allclose(1.0 - pmf[:, 0], bgnbd_p_any(fitter, 39.0, x, t_x, big_t))


def test_count_pmf_matches_a_simulated_bgnbd_population() -> None:
    fitter = paper_fitter()
    n, k, big_t, horizon = 100_000, 40, 39.0, 39.0
    times, x, t_x = simulated_bgnbd_population(PAPER, n, k, big_t, seed=3)
    holdout = (times <= big_t + horizon).sum(axis=1) - x
    for frequency in range(3):
        rows = x == frequency
        pmf = bgnbd_count_pmf(
            fitter, horizon, x[rows].astype(float), t_x[rows], np.full(rows.sum(), big_t)
        )
        simulated = np.bincount(holdout[rows], minlength=5)[:5] / rows.sum()
        se = np.sqrt(simulated * (1 - simulated) / rows.sum())
        assert (np.abs(pmf[:, :5].mean(axis=0) - simulated) < 4 * se + 1e-4).all(), frequency


def test_spend_cdf_mixes_beta_prime_sums_over_the_counts() -> None:
    """n values Gamma(p, nu), nu ~ Gamma(p x + q, v + x m): their sum is (v + x m) times a
    beta-prime(n p, p x + q) variable."""
    fitter = GammaGammaFitter()
    p, q, v = 6.25, 3.74, 15.44
    fitter.params_ = pd.Series({"p": p, "q": q, "v": v})
    counts = np.array([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    x, m = np.array([0.0, 3.0, 2.0]), np.array([0.0, 20.0, 30.0])
    spend = np.array([40.0, 55.0, 10.0])
    cdf = gamma_gamma_spend_cdf(fitter, counts, spend, x, m)
    assert cdf[0] == pytest.approx(betaprime.cdf(40.0, p, q, scale=v))
    assert cdf[1] == pytest.approx(0.5 + 0.5 * betaprime.cdf(55.0, 2 * p, 3 * p + q, scale=v + 60))
    assert cdf[2] == 1.0


def test_holdout_distribution_is_consistent_with_predict(
    sample_events: pd.DataFrame, sample_model: BGNBDGammaGamma
) -> None:
    actual = holdout_actuals(sample_events, CUTOFF, HOLDOUT_END).iloc[::-1]  # any order
    distribution = sample_model.holdout_distribution(HOLDOUT_END, actual)
    pred = sample_model.predict(HOLDOUT_END).loc[actual.index]
    pmf = distribution.txn_pmf
    np.testing.assert_allclose(pmf @ np.arange(pmf.shape[1]), pred["pred_txn"], rtol=1e-6)
    np.testing.assert_array_equal(distribution.txn, actual["txn"])
    spent = actual["spend"].to_numpy() > 0
    np.testing.assert_array_equal(distribution.spend_lower[~spent], 0.0)
    np.testing.assert_allclose(distribution.spend_upper[~spent], pmf[~spent, 0])
    np.testing.assert_array_equal(distribution.spend_lower[spent], distribution.spend_upper[spent])
    assert (distribution.spend_upper[spent] > pmf[spent, 0]).all()


def test_predict_is_consistent(sample_model: BGNBDGammaGamma) -> None:
    pred = sample_model.predict(HOLDOUT_END)
    assert list(pred.columns) == ["pred_txn", "pred_spend", "p_alive", "p_any"]
    assert pred.index.equals(sample_model.summary_.index)
    assert ((pred["p_any"] > 0) & (pred["p_any"] < pred["p_alive"])).all()
    one_time_buyers = pred[sample_model.summary_["frequency"] == 0]
    assert (one_time_buyers["p_alive"] == 1.0).all()
    p = sample_model.params
    population_value = p["p"] * p["v"] / (p["q"] - 1)
    np.testing.assert_allclose(
        one_time_buyers["pred_spend"], one_time_buyers["pred_txn"] * population_value
    )


def test_cumulative_curves_track_the_sample(
    sample_events: pd.DataFrame, sample_model: BGNBDGammaGamma
) -> None:
    grid = week_ends("1997-01-01", HOLDOUT_END)
    tracking = weekly_tracking(
        sample_events,
        CUTOFF,
        HOLDOUT_END,
        expected_cumulative={"bgnbd": sample_model.expected_cumulative_repeats(grid)},
        holdout_cumulative={"bgnbd_holdout": sample_model.expected_cumulative_holdout(grid)},
    )
    at_cutoff = tracking.loc[pd.Timestamp(CUTOFF)]
    assert at_cutoff["actual"] == 4814 - 2357  # calibration transactions minus first purchases
    assert at_cutoff["bgnbd"] == pytest.approx(at_cutoff["actual"], rel=0.02)
    assert np.isnan(at_cutoff["bgnbd_holdout"])
    holdout_total = sample_model.predict(HOLDOUT_END)["pred_txn"].sum()
    assert tracking["bgnbd_holdout"].iloc[-1] - at_cutoff["actual"] == pytest.approx(holdout_total)


def test_full_cohort_matches_reference_figures() -> None:
    events = load_cdnow("CDNOW_master.txt")
    model = BGNBDGammaGamma().fit(events, CUTOFF)
    pred = model.predict(HOLDOUT_END)
    actual = holdout_actuals(events, CUTOFF, HOLDOUT_END)
    assert len(actual) == 23_570
    assert actual["txn"].sum() == 19_684
    metrics = forecast_metrics(pred, actual)
    assert metrics["txn_mae"] == pytest.approx(0.819, abs=0.001)
    assert metrics["txn_rmse"] == pytest.approx(1.733, abs=0.001)
    assert metrics["txn_total_pct_err"] == pytest.approx(-14.3, abs=0.1)
    assert metrics["spend_mae"] == pytest.approx(32.68, abs=0.01)
    assert metrics["spend_rmse"] == pytest.approx(92.94, abs=0.01)
    assert metrics["spend_total_pct_err"] == pytest.approx(-17.3, abs=0.1)
    # The reference AUROC 0.763 ranks customers by expected transactions; P(any) ranks worse.
    assert auroc(pred["pred_txn"].to_numpy(), actual["txn"].to_numpy() > 0) == pytest.approx(
        0.763, abs=0.001
    )
    assert metrics["auroc_any"] == pytest.approx(0.747, abs=0.001)
    # its distributions (fintwin.twin.scores), regression values of this code
    scores = model.holdout_distribution(HOLDOUT_END, actual).scores()
    assert scores["txn_log_score"] == pytest.approx(-1.0156, abs=1e-4)
    assert scores["txn_rps"] == pytest.approx(0.5398, abs=1e-4)
    assert scores["txn_pit_ks"] == pytest.approx(0.0213, abs=1e-4)
    assert scores["txn_pit_cover80"] == pytest.approx(0.7890, abs=1e-4)
    assert scores["spend_pit_cover80"] == pytest.approx(0.7871, abs=1e-4)
