"""The exact oracle of the synthetic world and the history-free baseline."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.integrate import quad
from scipy.special import expit, logsumexp

from fintwin.data.oracle import (
    LOG_COLUMNS,
    fit_marginal_baseline,
    nll_per_event,
    oracle_log_likelihood,
)
from fintwin.data.simulator import (
    CHANNELS,
    EVENT_TYPES,
    SEGMENTS,
    SimulatorConfig,
    customer_segments,
    simulate,
)
from tests.data.true_next_event import next_event_distribution, sample_next_event

SMALL = SimulatorConfig(n_customers=400, seed=3)


@pytest.fixture(scope="module")
def world() -> pd.DataFrame:
    return simulate(SMALL)


def _table(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["customer_id", "timestamp", "event_type", "amount"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    return frame


HAND_MADE = _table(
    [
        ("b", "2023-03-01 08:00", "card_payment", 25.0),
        ("a", "2023-01-06 00:00", "app_login", 0.0),  # Friday
        ("a", "2023-01-07 12:00", "salary", 3000.0),  # Saturday
        ("a", "2023-01-08 00:00", "loan_payment", 650.0),  # Sunday
        ("c", "2023-02-01 00:00", "salary", 2500.0),
        ("c", "2023-02-01 00:00", "card_payment", 0.0),  # a tie: gap clamped
        ("c", "2023-02-20 18:30", "transfer", 120.0),
        ("c", "2023-03-05 09:00", "app_login", 0.0),
    ]
)


# 1. the true process beats perturbed ones on its own data ---------------------------------


@pytest.mark.parametrize(
    ("perturb", "margin"),
    [
        ({"gap_median_days": [2 * g for g in SMALL.gap_median_days]}, 0.2),
        # segment parameters shuffled: each segment gets the next one's amounts and gaps
        (
            {
                "amount_median": SMALL.amount_median[1:] + SMALL.amount_median[:1],
                "gap_median_days": SMALL.gap_median_days[1:] + SMALL.gap_median_days[:1],
            },
            0.2,
        ),
        ({"salary_rhythm": [0.0] * len(SEGMENTS)}, 0.15),
        ({"gap_median_days": [1.2 * g for g in SMALL.gap_median_days]}, 0.01),
    ],
)
def test_oracle_beats_perturbed_process(world, perturb, margin):
    true = nll_per_event(oracle_log_likelihood(world, SMALL))["total"]
    wrong = nll_per_event(oracle_log_likelihood(world, dataclasses.replace(SMALL, **perturb)))
    assert wrong["total"] - true > margin


def test_posterior_identifies_the_true_segment(world):
    dist = next_event_distribution(world, SMALL)
    truth = customer_segments(SMALL).reindex(dist.customer_id).to_numpy()
    guess = np.array(SEGMENTS)[dist.segment_posterior.argmax(axis=1)]
    n_events = world.groupby("customer_id").size().reindex(dist.customer_id).to_numpy()
    assert np.mean(guess[n_events >= 20] == truth[n_events >= 20]) > 0.95
    single = n_events == 1
    np.testing.assert_allclose(dist.segment_posterior[single], [SMALL.segment_prior] * single.sum())


# 2. history matters: the oracle beats the history-free baseline -----------------------------


def test_marginal_baseline_is_worse_than_oracle_by_half_to_one_and_a_half_nats():
    config = dataclasses.replace(SimulatorConfig(), n_customers=1000)
    events = simulate(config)
    oracle = oracle_log_likelihood(events, config)
    baseline = fit_marginal_baseline(events, config.end).log_likelihood(events, config.end)
    assert list(baseline.columns) == list(oracle.columns)
    for column in LOG_COLUMNS:
        assert baseline[column].isna().equals(oracle[column].isna())
    gap = nll_per_event(baseline)["total"] - nll_per_event(oracle)["total"]
    assert 0.5 <= gap <= 1.5
    terms = nll_per_event(oracle)
    assert terms["total"] == pytest.approx(terms["event"] + terms["censored"])
    # an uncertain segment only couples the terms a little: sum of terms ~ joint
    assert terms["type"] + terms["gap"] + terms["amount"] == pytest.approx(terms["event"], abs=0.01)


# 3. the oracle's densities are normalised and match the sampler ---------------------------


def test_gap_density_with_dormancy_integrates_to_one():
    dist = next_event_distribution(HAND_MADE, SimulatorConfig())
    for c in range(len(dist.customer_id)):

        def density(g: float, c: int = c) -> float:
            return float(np.exp(dist.gap_log_density(np.full(3, g))[c]))

        mass, _ = quad(density, 0, np.inf, limit=200)
        assert mass + dist.dormant_prob()[c] == pytest.approx(1.0, abs=1e-6)
        assert dist.survival(np.zeros(3))[c] == pytest.approx(1.0)
    np.testing.assert_allclose(dist.type_probs().sum(axis=1), 1.0)


def test_monte_carlo_next_event_matches_oracle_distribution():
    config = SimulatorConfig()
    dist = next_event_distribution(HAND_MADE, config)
    draws = sample_next_event(HAND_MADE, config, n_samples=40_000, seed=5)
    for c, customer in enumerate(dist.customer_id):
        sample = draws[draws["customer_id"] == customer]
        q = dist.dormant_prob()[c]
        assert abs(sample["dormant"].mean() - q) < 4 * np.sqrt(q * (1 - q) / len(sample)) + 1e-9
        back = sample[~sample["dormant"]]
        freq = back["event_type"].value_counts(normalize=True).reindex(EVENT_TYPES, fill_value=0)
        p = dist.type_probs()[c]
        np.testing.assert_array_less(
            np.abs(freq.to_numpy() - p), 4 * np.sqrt(p * (1 - p) / len(back)) + 1e-3
        )
        for days in (0.3, 1.0, 3.0, 10.0):
            s = dist.survival(np.full(3, days))[c]
            empirical = (sample["dormant"] | (sample["gap_days"] > days)).mean()
            assert abs(empirical - s) < 4 * np.sqrt(s * (1 - s) / len(sample))
        w = dist.segment_posterior[c] * (1 - dist.dormant_prob_by_segment[c])
        weight = (
            (w / w.sum())[:, None] * dist.type_probs_by_segment[c] * (1 - dist.amount_zero_prob[c])
        )
        for amount in (10.0, 100.0, 1000.0, 5000.0):
            sf = stats.lognorm.sf(amount, s=dist.amount_sigma[c], scale=np.exp(dist.amount_mu[c]))
            expected = float(np.sum(weight * sf))
            empirical = (back["amount"] > amount).mean()
            assert abs(empirical - expected) < 4 * np.sqrt(expected * (1 - expected) / len(back))
        standard_error = back["amount"].std() / np.sqrt(len(back))
        assert abs(back["amount"].mean() - dist.amount_mean()[c]) < 4 * standard_error


# 4. the oracle on a hand-made table ----------------------------------------------------------


def test_oracle_on_hand_made_table_has_documented_columns_and_finite_values():
    out = oracle_log_likelihood(HAND_MADE, SimulatorConfig(), "2023-04-01")
    assert list(out.columns) == ["customer_id", "timestamp", "event_type", *LOG_COLUMNS]
    assert out["customer_id"].tolist() == ["a"] * 3 + ["b"] + ["c"] * 4
    assert out.index.tolist() == [1, 2, 3, 0, 4, 5, 6, 7]  # sorted, input index kept
    first = out["customer_id"] != out["customer_id"].shift()
    last = out["customer_id"] != out["customer_id"].shift(-1)
    for column in LOG_COLUMNS[:-1]:
        assert out.loc[first, column].isna().all()
        assert np.isfinite(out.loc[~first, column]).all()
    assert out.loc[~last, "log_p_censored"].isna().all()
    assert (out.loc[last, "log_p_censored"] < 0).all()
    assert np.isfinite(out.loc[last, "log_p_censored"]).all()


def _lognormal_logpdf(x: float, mu: float, sigma: float) -> float:
    return float(stats.lognorm.logpdf(x, s=sigma, scale=np.exp(mu)))


def test_oracle_matches_the_documented_formulas_for_a_known_segment():
    """One customer, segment fixed by a one-hot prior, each term computed from the docs."""
    config = dataclasses.replace(SimulatorConfig(), segment_prior=[0.0, 1.0, 0.0, 0.0])
    s, salary, loan, login = 1, 0, 4, 5
    events = HAND_MADE[HAND_MADE["customer_id"] == "a"]
    out = oracle_log_likelihood(events, config, "2023-01-15")
    q = config.dormancy_prob[s]

    def log_type(next_type: int, last: int, since_salary: float) -> float:
        logits = np.array(config.type_logits[s]) + np.array(config.transition_logits[last])
        rhythm = expit((since_salary - config.salary_period_days) / config.salary_window_days)
        logits[salary] += config.salary_rhythm[s] * rhythm
        return float(logits[next_type] - logsumexp(logits))

    def gap_mu(last: int, since_salary: float, weekend: bool) -> float:
        return (
            np.log(config.gap_median_days[s])
            + config.gap_log_shift[last]
            + config.payday_gap_shift * np.exp(-since_salary / config.payday_decay_days)
            + config.weekend_gap_shift * weekend
        )

    sigma = config.gap_sigma[s]
    # event 2: salary 1.5 days after joining on a Friday
    assert out["log_p_type"].iloc[1] == pytest.approx(log_type(salary, login, 0.0))
    expected_gap = np.log1p(-q) + _lognormal_logpdf(1.5, gap_mu(login, 0.0, False), sigma)
    assert out["log_p_gap"].iloc[1] == pytest.approx(expected_gap)
    expected_amount = _lognormal_logpdf(3000.0, np.log(2800.0), config.amount_sigma[salary])
    assert out["log_p_amount"].iloc[1] == pytest.approx(expected_amount)
    # event 3: loan payment 0.5 days after the salary, which fell on a Saturday
    assert out["log_p_type"].iloc[2] == pytest.approx(log_type(loan, salary, 0.0))
    expected_gap = np.log1p(-q) + _lognormal_logpdf(0.5, gap_mu(salary, 0.0, True), sigma)
    assert out["log_p_gap"].iloc[2] == pytest.approx(expected_gap)
    for i in (1, 2):
        terms = out[["log_p_type", "log_p_gap", "log_p_amount"]].iloc[i].sum()
        assert out["log_p_event"].iloc[i] == pytest.approx(terms)
    # censored: 7 days from Sunday's loan payment (0.5 days after the salary) to the end
    survival = stats.lognorm.sf(7.0, s=sigma, scale=np.exp(gap_mu(loan, 0.5, True)))
    assert out["log_p_censored"].iloc[2] == pytest.approx(np.log(q + (1 - q) * survival))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event_type": "atm_deposit"}, "not in the vocabulary"),
        ({"event_type": "app_login", "amount": 5.0}, "impossible"),
        ({"amount": -1.0}, ">= 0"),
        ({"timestamp": pd.Timestamp("2030-01-01")}, "after observation_end"),
    ],
)
def test_oracle_rejects_tables_the_process_cannot_produce(change, message):
    bad = HAND_MADE.copy()
    for column, value in change.items():
        bad.loc[6, column] = value
    with pytest.raises(ValueError, match=message):
        oracle_log_likelihood(bad, SimulatorConfig(), "2024-01-01")


# 4. the categorical channel: an observed input the oracle conditions on -------------------

CHANNEL_WORLD = dataclasses.replace(SMALL, n_customers=1000, categorical_channel=True)


@pytest.fixture(scope="module")
def channel_world() -> pd.DataFrame:
    return simulate(CHANNEL_WORLD)


def test_oracle_beats_a_channel_blind_process(channel_world):
    true = nll_per_event(oracle_log_likelihood(channel_world, CHANNEL_WORLD))["total"]
    blind = dataclasses.replace(
        CHANNEL_WORLD,
        channel_type_logits=[[0.0] * len(EVENT_TYPES)] * len(CHANNELS),
        channel_gap_shift=[0.0] * len(CHANNELS),
        channel_amount_shift=[0.0] * len(CHANNELS),
    )
    wrong = nll_per_event(oracle_log_likelihood(channel_world, blind))["total"]
    assert wrong - true > 0.3


def test_oracle_conditions_on_the_last_channel_and_weighs_channels_in_the_posterior():
    """Type, gap and amount follow the last event's channel; the segment posterior weighs
    every channel by its Dirichlet-multinomial probability (formulas of the module docs)."""
    config = dataclasses.replace(SimulatorConfig(), categorical_channel=True)
    s, login, salary = 1, 5, 0
    events = HAND_MADE[HAND_MADE["customer_id"] == "a"].assign(
        channel=["branch", "online", "online"]
    )
    known = dataclasses.replace(config, segment_prior=[0.0, 1.0, 0.0, 0.0])
    out = oracle_log_likelihood(events, known, "2023-01-15")
    branch, online = CHANNELS.index("branch"), CHANNELS.index("online")
    logits = np.array(config.type_logits[s]) + np.array(config.transition_logits[login])
    logits += np.array(config.channel_type_logits[branch])
    logits[salary] += config.salary_rhythm[s] * expit(-config.salary_period_days)
    assert out["log_p_type"].iloc[1] == pytest.approx(logits[salary] - logsumexp(logits))
    mu = (np.log(config.gap_median_days[s]) + config.gap_log_shift[login]
          + config.payday_gap_shift + config.channel_gap_shift[branch])  # fmt: skip
    expected_gap = np.log1p(-config.dormancy_prob[s]) + stats.lognorm.logpdf(
        1.5, s=config.gap_sigma[s], scale=np.exp(mu)
    )
    assert out["log_p_gap"].iloc[1] == pytest.approx(expected_gap)
    amount_mu = np.log(2800.0) + config.channel_amount_shift[branch]
    expected_amount = stats.lognorm.logpdf(
        3000.0, s=config.amount_sigma[salary], scale=np.exp(amount_mu)
    )
    assert out["log_p_amount"].iloc[1] == pytest.approx(expected_amount)

    # one event per customer: only its channel informs the segment posterior
    single = HAND_MADE[HAND_MADE["customer_id"] == "b"].assign(channel="branch")
    prior, probs = np.array(config.segment_prior), np.array(config.channel_probs)
    posterior = prior * probs[:, branch] / (prior * probs[:, branch]).sum()
    t = pd.Timestamp("2023-03-01 08:00")
    elapsed = (pd.Timestamp("2023-03-10") - t) / pd.Timedelta(days=1)
    survival = 0.0
    for seg in range(len(SEGMENTS)):
        mu = (np.log(config.gap_median_days[seg]) + config.gap_log_shift[1]
              + config.payday_gap_shift * np.exp(-0.0) + config.channel_gap_shift[branch])  # fmt: skip
        q = config.dormancy_prob[seg]
        sf = stats.lognorm.sf(elapsed, s=config.gap_sigma[seg], scale=np.exp(mu))
        survival += posterior[seg] * (q + (1 - q) * sf)
    censored = oracle_log_likelihood(single, config, "2023-03-10")["log_p_censored"].iloc[0]
    assert censored == pytest.approx(np.log(survival))
    # a second channel is weighed given the first: (alpha_c + n_c) / (sum(alpha) + n)
    pair = events.iloc[:2].assign(channel=["online", "online"])
    alpha = config.channel_concentration * probs
    weights = prior * (alpha[:, online] / alpha.sum(axis=1))
    weights *= (alpha[:, online] + 1) / (alpha.sum(axis=1) + 1)
    got = oracle_log_likelihood(pair, config, "2023-01-15")["log_p_censored"].iloc[1]
    assert got == pytest.approx(_censored_given_weights(pair, config, "2023-01-15")(weights))


def _censored_given_weights(pair: pd.DataFrame, config: SimulatorConfig, end: str):
    """log P(no event until ``end``) after the pair as a function of the segment weights the
    channels (and the prior) give; the second event's own terms and the survival per segment
    come from the oracle with one-hot segment priors."""
    terms, survival = [], []
    for seg in range(len(SEGMENTS)):
        known = dataclasses.replace(config, segment_prior=list(np.eye(len(SEGMENTS))[seg]))
        out = oracle_log_likelihood(pair, known, end)
        terms.append(out["log_p_event"].iloc[1])
        survival.append(out["log_p_censored"].iloc[1])
    terms, survival = np.array(terms), np.array(survival)

    def log_survival(channel_weights: np.ndarray) -> float:
        log_w = np.log(channel_weights) + terms
        return float(logsumexp(log_w + survival) - logsumexp(log_w))

    return log_survival


def test_oracle_refuses_a_world_with_channels_without_them():
    config = dataclasses.replace(SimulatorConfig(), categorical_channel=True)
    with pytest.raises(ValueError, match=r"missing required columns: \['channel'\]"):
        oracle_log_likelihood(HAND_MADE, config, "2024-01-01")
    with pytest.raises(ValueError, match=r"channel values not in the vocabulary.*'atm'"):
        oracle_log_likelihood(HAND_MADE.assign(channel="atm"), config, "2024-01-01")
