"""Probabilistic scores on hand-made distributions, values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import poisson

from fintwin.twin.scores import (
    LOG_FLOOR,
    SCORE_KEYS,
    HoldoutDistribution,
    count_pit_bounds,
    expected_coverage,
    interval_coverage,
    log_score,
    pit_cdf,
    pit_coverage,
    pit_histogram,
    pit_ks,
    rank_bounds,
    ranked_probability_score,
    sample_pmf,
)

POINT_AT_2 = [0.0, 0.0, 1.0, 0.0, 0.0]  # 0..3, then the tail P(X >= 4)
UNIFORM_0_3 = [0.25, 0.25, 0.25, 0.25, 0.0]


def rows(pmf: list[float], n: int) -> np.ndarray:
    return np.tile(pmf, (n, 1))


def test_point_mass() -> None:
    pmf = rows(POINT_AT_2, 3)
    counts = np.array([2, 0, 5])
    # log 1 = 0, then the floor for the impossible 0, and 5 >= 4 scores the empty tail
    assert log_score(pmf[:1], counts[:1]) == (0.0, 0.0)
    assert log_score(pmf, counts) == pytest.approx((2 * math.log(LOG_FLOOR) / 3, 2 / 3))
    # a point mass at m scores |y - m|: 0, 2 and 3 (one unit beyond the last column)
    assert ranked_probability_score(pmf, counts) == pytest.approx((0 + 2 + 3) / 3)
    lower, upper = count_pit_bounds(pmf, counts)
    np.testing.assert_array_equal(lower, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(upper, [1.0, 0.0, 1.0])
    # the 80% interval is [2, 2]: only the first actual is inside
    assert interval_coverage(lower, upper, 0.8) == pytest.approx(1 / 3)
    assert expected_coverage(pmf, 0.8) == 1.0


def test_uniform_over_0_to_3() -> None:
    pmf = rows(UNIFORM_0_3, 4)
    counts = np.array([0, 1, 2, 3])
    assert log_score(pmf, counts) == (pytest.approx(math.log(0.25)), 0.0)
    # F = .25 .5 .75 1: y = 1 gives .25^2 + .5^2 + .25^2 = .375, y = 3 gives .875
    assert ranked_probability_score(pmf[:1], [1]) == pytest.approx(0.375)
    assert ranked_probability_score(pmf[:1], [3]) == pytest.approx(0.875)
    assert ranked_probability_score(pmf, counts) == pytest.approx(
        (0.875 + 0.375 + 0.375 + 0.875) / 4
    )
    lower, upper = count_pit_bounds(pmf, counts)
    np.testing.assert_allclose(lower, [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(upper, [0.25, 0.5, 0.75, 1.0])
    # outcomes drawn evenly from the forecast: a calibrated forecaster
    assert pit_ks(lower, upper) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(pit_histogram(lower, upper, 5), np.ones(5))
    assert pit_coverage(lower, upper, 0.5) == pytest.approx(0.5)
    assert pit_coverage(lower, upper, 0.8) == pytest.approx(0.8)
    # 50%: quantiles .25 and .75 are 0 and 2, holding 3/4 of the mass; 80%: [0, 3], all of it
    assert interval_coverage(lower, upper, 0.5) == 0.75
    assert expected_coverage(pmf, 0.5) == 0.75
    assert interval_coverage(lower, upper, 0.8) == 1.0
    assert expected_coverage(pmf, 0.8) == 1.0


def test_poisson_against_the_crps_identity() -> None:
    """RPS = E|X - y| - E|X - X'| / 2 for an integer forecast (Gneiting and Raftery 2007)."""
    n = 60
    k = np.arange(n)
    pmf = np.append(poisson.pmf(k, 2.0), poisson.sf(n - 1, 2.0))[None, :]
    assert log_score(pmf, [2])[0] == pytest.approx(math.log(2.0) - 2.0)
    p = pmf[0, :-1]
    for y in (0, 2, 7):
        identity = p @ np.abs(k - y) - 0.5 * p @ np.abs(k[:, None] - k[None, :]) @ p
        assert ranked_probability_score(pmf, [y]) == pytest.approx(identity, rel=1e-12)
    lower, upper = count_pit_bounds(pmf, [2])
    assert (lower[0], upper[0]) == pytest.approx((3 * math.exp(-2.0), 5 * math.exp(-2.0)))


def test_pit_of_one_interval_and_of_atoms() -> None:
    # one customer, PIT uniform on [.25, .5]: F_bar rises from 0 at .25 to 1 at .5
    one = (np.array([0.25]), np.array([0.5]))
    np.testing.assert_allclose(pit_cdf(*one, np.array([0.2, 0.3, 0.5, 0.9])), [0, 0.2, 1, 1])
    assert pit_ks(*one) == pytest.approx(0.5)
    np.testing.assert_allclose(pit_histogram(*one, 4), [0.0, 4.0, 0.0, 0.0])
    # two atoms, at .3 and .7: steps of 1/2; the worst gap is .3, before the first
    atoms = (np.array([0.3, 0.7]), np.array([0.3, 0.7]))
    np.testing.assert_allclose(pit_cdf(*atoms, np.array([0.29, 0.3, 0.69, 0.7])), [0, 0.5, 0.5, 1])
    assert pit_ks(*atoms) == pytest.approx(0.3)
    assert pit_coverage(*atoms, 0.5) == 1.0
    # atoms and intervals together: [0, .5] and an atom at .75
    mixed = (np.array([0.0, 0.75]), np.array([0.5, 0.75]))
    np.testing.assert_allclose(pit_cdf(*mixed, np.array([0.25, 0.5, 0.75])), [0.25, 0.5, 1.0])
    assert pit_ks(*mixed) == pytest.approx(0.25)  # 0.5 at u -> .75 from below


def test_interval_coverage_uses_the_inverse_cdf_quantiles() -> None:
    """y is inside [q(a), q(1 - a)] iff F(y) >= a and F(y - 1) < 1 - a."""
    pmf = rows([0.85, 0.1, 0.05, 0.0], 3)  # F = .85 .95 1: 80% interval [0, 1], 50% [0, 0]
    lower, upper = count_pit_bounds(pmf, np.array([0, 1, 2]))
    assert interval_coverage(lower, upper, 0.8) == pytest.approx(2 / 3)
    assert interval_coverage(lower, upper, 0.5) == pytest.approx(1 / 3)
    assert expected_coverage(pmf, 0.8) == pytest.approx(0.95)
    assert expected_coverage(pmf, 0.5) == pytest.approx(0.85)


def test_sample_pmf_smooths_towards_the_pooled_samples() -> None:
    samples = np.array([[0, 0, 1, 3], [2, 2, 2, 2]])
    # counts per row over 0..4 (one column past the largest sample), pooled [2, 1, 4, 1, 0] / 8,
    # then (counts + pooled) / (4 + 1)
    expected = np.array([[0.45, 0.225, 0.1, 0.225, 0.0], [0.05, 0.025, 0.9, 0.025, 0.0]])
    np.testing.assert_allclose(sample_pmf(samples), expected)
    np.testing.assert_allclose(sample_pmf(samples, concentration=0.0)[1], [0, 0, 1, 0, 0])


def test_rank_bounds_spread_the_actuals_rank_over_s_plus_1_bins() -> None:
    samples = np.array([[0.0, 0.0, 5.0, 10.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 7.0]])
    lower, upper = rank_bounds(samples, np.array([6.0, 0.0, 0.0]))
    # 3 below 6; 0 below 0; none below 0 and 3 ties at 0: ranks out of S + 1 = 5
    np.testing.assert_allclose(lower, [0.6, 0.0, 0.0])
    np.testing.assert_allclose(upper, [0.8, 0.2, 0.8])


def test_rank_pit_is_uniform_for_an_exchangeable_actual() -> None:
    rng = np.random.default_rng(0)
    draws = rng.lognormal(3.0, 1.0, (20_000, 100))
    lower, upper = rank_bounds(draws[:, 1:], draws[:, 0])  # S = 99: 100 ranks
    assert pit_ks(lower, upper) < 0.015
    assert pit_coverage(lower, upper, 0.8) == pytest.approx(0.8, abs=0.01)
    # ranks 9..89 of 0..99 (k / 100 < .9 and (k + 1) / 100 >= .1): 81 of 100
    assert interval_coverage(lower, upper, 0.8) == pytest.approx(0.81, abs=0.01)


def test_holdout_distribution_scores_every_key() -> None:
    txn_samples = np.array([[0, 0, 1, 3], [2, 2, 2, 2]])
    spend_samples = np.array([[0.0, 0.0, 5.0, 10.0], [1.0, 2.0, 3.0, 4.0]])
    distribution = HoldoutDistribution.from_samples(
        txn_samples, spend_samples, np.array([1, 2]), np.array([5.0, 0.0])
    )
    scores = distribution.scores()
    assert tuple(scores) == SCORE_KEYS
    assert scores["txn_log_score"] == pytest.approx((math.log(0.225) + math.log(0.9)) / 2)
    # spend ranks: 5 ties the third sample, [2/5, 4/5]; 0 is below every sample, [0, 1/5]:
    # the 50% interval needs F(s) >= .25 and F(s-) < .75, the 80% one holds every rank of 5
    assert scores["spend_cover50"] == 0.5
    assert scores["spend_cover80"] == 1.0
    assert scores["spend_pit_ks"] == pytest.approx(0.3)  # F_bar(.2) = .5
    histograms = distribution.pit_histograms(bins=4)
    assert histograms["txn"].mean() == pytest.approx(1.0)
    assert histograms["spend"].mean() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("pmf", "message"),
    [
        ([[0.5, 0.4]], "row 0 sums to 0.9, not 1"),
        ([[1.2, -0.2]], "row 0 has a negative or non-finite probability"),
        ([0.5, 0.5], "expected a 2-D array"),
    ],
)
def test_bad_pmfs_are_refused(pmf: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        log_score(np.array(pmf), np.array([0]))


def test_bad_counts_and_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="row 1 is 1.5, not a count"):
        ranked_probability_score(rows(UNIFORM_0_3, 2), np.array([1.0, 1.5]))
    with pytest.raises(ValueError, match="row 0 has F"):
        pit_ks(np.array([0.6]), np.array([0.5]))
