"""Monte Carlo rollouts: known distributions, conditioning on silence, paths, cache, seeds."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from fintwin.data.features import OOV_ID, OOV_LABEL, PAD_ID, PAD_LABEL
from fintwin.errors import FintwinInputError
from fintwin.twin.rollout import Calendar, RolloutConfig, model_device, rollout, step_inputs
from tests.twin.conftest import (
    CUTOFF,
    SPEC,
    START,
    VOCAB,
    KnownHeads,
    build_twin,
    fix_heads,
    history_events,
    renewal_counts,
    window_days,
)

HORIZON_END = "2024-04-30"  # a 30-day window


def test_mean_count_and_spend_match_the_renewal_process(known_heads: KnownHeads) -> None:
    elapsed = [0.5, 4.0, 9.0]
    model = fix_heads(build_twin(), known_heads)
    sequences = SPEC.sequences(history_events(elapsed), CUTOFF)
    result = rollout(model, sequences, VOCAB, HORIZON_END, RolloutConfig(samples=3000, seed=1))
    rng = np.random.default_rng(0)
    window = window_days(HORIZON_END)
    for i, c in enumerate(elapsed):
        row = result.summary.loc[f"c{i}"]
        reference = renewal_counts(
            rng, 100_000, c, window, known_heads.gap_median, known_heads.gap_sigma
        )
        mean, se = reference.mean(), reference.std() / math.sqrt(len(reference))
        assert abs(row["expected_count"] - mean) < 3 * math.hypot(row["expected_count_se"], se)
        spend = mean * known_heads.amount_mean
        assert abs(row["expected_spend"] - spend) < 3 * row["expected_spend_se"] + 0.01 * spend
    assert result.n_capped == 0
    assert (result.summary["p_active"] > 0.99).all()  # no dormancy, gaps far below 30 days


def test_first_gap_is_conditioned_on_the_silence_since_the_last_event() -> None:
    heads = KnownHeads(gap_median=10.0, gap_sigma=1.0, p_dormant=0.3)
    elapsed = [2.0, 20.0, 60.0]
    model = fix_heads(build_twin(), heads)
    sequences = SPEC.sequences(history_events(elapsed), CUTOFF)
    config = RolloutConfig(samples=4000, seed=3, chunk_customers=1, keep_paths=True)
    result = rollout(model, sequences, VOCAB, HORIZON_END, config)
    window = window_days(HORIZON_END)
    first = result.paths.groupby(["customer_id", "sample"])["timestamp"].min()
    first_days = (first - START) / pd.Timedelta(days=1)

    def survival(days: float) -> float:
        return norm.sf((math.log(days) - math.log(heads.gap_median)) / heads.gap_sigma)

    for i, c in enumerate(elapsed):
        row = result.summary.loc[f"c{i}"]
        silent = heads.p_dormant + (1 - heads.p_dormant) * survival(c)
        assert row["p_alive"] == pytest.approx(1 - heads.p_dormant / silent, rel=1e-4)
        p_none = (heads.p_dormant + (1 - heads.p_dormant) * survival(c + window)) / silent
        assert abs((1 - row["p_active"]) - p_none) < 3 * row["p_active_se"]
        for t in (window / 4, window / 2):
            expected = (1 - heads.p_dormant) * (survival(c) - survival(c + t)) / silent
            observed = (first_days.loc[f"c{i}"] < t).sum() / config.samples
            se = math.sqrt(expected * (1 - expected) / config.samples)
            assert abs(observed - expected) < 3 * se


def test_paths_move_forward_inside_the_window_and_match_the_summary() -> None:
    heads = KnownHeads(gap_median=2.0, gap_sigma=1.0, p_dormant=0.1)
    model = fix_heads(build_twin(), heads)
    sequences = SPEC.sequences(history_events([0.2, 3.0, 15.0]), CUTOFF)
    config = RolloutConfig(samples=200, seed=5, keep_paths=True, keep_outcomes=True)
    result = rollout(model, sequences, VOCAB, HORIZON_END, config)
    paths = result.paths
    end = pd.Timestamp(HORIZON_END) + pd.Timedelta(days=1)
    assert len(paths) > 1000
    assert (paths["timestamp"] >= START).all() and (paths["timestamp"] < end).all()
    steps = paths.groupby(["customer_id", "sample"])["timestamp"].diff().dropna()
    assert (steps > pd.Timedelta(0)).all()
    assert set(paths["event_type"]) == set(VOCAB.tokens) and not paths["injected"].any()

    per_path = paths.assign(day=paths["timestamp"].dt.normalize()).groupby("customer_id")
    summary = result.summary
    np.testing.assert_allclose(per_path.size() / 200, summary["expected_count"])
    np.testing.assert_allclose(per_path["amount"].sum() / 200, summary["expected_spend"])
    days = paths.assign(day=paths["timestamp"].dt.normalize())
    distinct = days.drop_duplicates(["customer_id", "sample", "day"])
    np.testing.assert_allclose(
        distinct.groupby("customer_id").size() / 200, summary["expected_transactions"]
    )
    daily = distinct.groupby("day").size() / 200
    np.testing.assert_allclose(result.daily_transactions.reindex(daily.index), daily)
    # every path's outcomes, in the summary's rows
    full = pd.MultiIndex.from_product([summary.index, range(200)])
    per_sample = distinct.groupby(["customer_id", "sample"]).size().reindex(full, fill_value=0)
    np.testing.assert_array_equal(result.path_transactions, per_sample.to_numpy().reshape(3, 200))
    spend = paths.groupby(["customer_id", "sample"])["amount"].sum().reindex(full, fill_value=0)
    np.testing.assert_allclose(result.path_spend, spend.to_numpy().reshape(3, 200), rtol=1e-6)
    assert result.daily_transactions.index[-1] == pd.Timestamp(HORIZON_END)
    assert summary["count_q50"].between(summary["count_q10"], summary["count_q90"]).all()


def test_sampled_types_are_named_by_the_vocabulary_labels() -> None:
    """Ids name types as everywhere else (the client's top types): OOV_LABEL for an unknown
    type, PAD_LABEL for padding."""
    labels = VOCAB.labels()
    assert labels[[PAD_ID, OOV_ID]].tolist() == [PAD_LABEL, OOV_LABEL] == ["<pad>", "<oov>"]
    assert labels[VOCAB.encode(["salary", "atm", "card"])].tolist() == ["salary", "<oov>", "card"]
    model = fix_heads(build_twin(), KnownHeads())
    with torch.no_grad():
        model.type_head.linear.bias[OOV_ID] = 40.0  # a twin that predicts unknown types only
    sequences = SPEC.sequences(history_events([1.0]), CUTOFF)
    config = RolloutConfig(samples=5, keep_paths=True)
    paths = rollout(model, sequences, VOCAB, HORIZON_END, config).paths
    assert len(paths) > 5 and set(paths["event_type"]) == {OOV_LABEL}


def test_max_steps_caps_paths_and_reports_them() -> None:
    model = fix_heads(build_twin(), KnownHeads(gap_median=0.05, gap_sigma=0.1))
    sequences = SPEC.sequences(history_events([0.01, 0.02]), CUTOFF)
    config = RolloutConfig(samples=10, max_steps=5)
    result = rollout(model, sequences, VOCAB, HORIZON_END, config)
    assert result.n_capped == result.n_paths == 20
    assert (result.summary["capped_paths"] == 10).all()
    assert (result.summary["expected_count"] == 5.0).all()
    assert result.max_steps_run == 5


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
def test_stepping_matches_reencoding_the_extended_history(encoder: str) -> None:
    model = build_twin(encoder, seed=2)
    with torch.no_grad():
        model.time_head.linear.bias[-1] = -8.0  # rarely dormant: several steps per path
    events = history_events([3.3], n_events=4, gap=4.5)
    sequences = SPEC.sequences(events, CUTOFF)
    config = RolloutConfig(samples=8, seed=7, keep_paths=True)
    paths = rollout(model, sequences, VOCAB, HORIZON_END, config).paths
    paths = paths[paths["sample"] == paths["sample"].mode()[0]]  # the busiest path
    assert len(paths) >= 3

    device = model_device(model)
    calendar = Calendar(START, 40, device, dates_only=False)
    state = model.encoder.prefix_state(sequences.batch(np.arange(1), with_targets=False))
    previous = torch.tensor([-3.3], dtype=torch.float64)
    stepped = []
    for _, event in paths.iterrows():
        time = torch.tensor(
            [(event["timestamp"] - START) / pd.Timedelta(days=1)], dtype=torch.float64
        )
        inputs = step_inputs(
            calendar,
            torch.tensor(VOCAB.encode([event["event_type"]])),
            torch.tensor([event["amount"]]),
            time,
            previous,
            None,
        )
        _, state = model.encoder.step(inputs, state)
        stepped.append(inputs)
        previous = time

    extended = pd.concat([events, paths[events.columns]], ignore_index=True)
    full = SPEC.sequences(extended, HORIZON_END).batch(np.arange(1), with_targets=False)
    n = len(events)
    for k, inputs in enumerate(stepped):
        for key, value in inputs.items():
            np.testing.assert_allclose(full[key][0, n + k].numpy(), value[0].numpy(), rtol=1e-5)

    with torch.no_grad():
        cached = model.head_outputs(state["hidden"])
        hidden = model(full)[:, -1]
        encoded = model.head_outputs(hidden)
    torch.testing.assert_close(cached.type_logits, encoded.type_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached.gap.loc, encoded.gap.loc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        cached.gap.dormant_logit, encoded.gap.dormant_logit, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(cached.amount.loc, encoded.amount.loc, atol=1e-4, rtol=1e-4)


def test_same_seed_same_paths_other_seed_other_paths() -> None:
    model = build_twin("transformer", seed=4)
    sequences = SPEC.sequences(history_events([1.0, 5.0, 30.0]), CUTOFF)
    config = RolloutConfig(samples=20, seed=11, keep_paths=True, chunk_customers=2)
    first = rollout(model, sequences, VOCAB, HORIZON_END, config)
    again = rollout(model, sequences, VOCAB, HORIZON_END, config)
    other = rollout(model, sequences, VOCAB, HORIZON_END, replace(config, seed=12))
    assert len(first.paths) > 0
    pd.testing.assert_frame_equal(first.paths, again.paths)
    pd.testing.assert_frame_equal(first.summary, again.summary)
    assert not first.paths.equals(other.paths)


def test_an_ensemble_pools_its_twins_paths() -> None:
    """Twin i simulates with seed + i; the pooled summary is over all their paths: means are
    the twins' average, quantiles those of the pooled paths, samples numbered on."""
    twins = [
        fix_heads(build_twin("lstm"), KnownHeads(gap_median=3.0, p_dormant=0.1)),
        fix_heads(build_twin("transformer"), KnownHeads(gap_median=12.0, p_dormant=0.3)),
    ]
    sequences = SPEC.sequences(history_events([1.0, 5.0, 30.0]), CUTOFF)
    config = RolloutConfig(
        samples=30, seed=5, keep_paths=True, keep_outcomes=True, quantiles=(0.5, 0.9)
    )
    pooled = rollout(twins, sequences, VOCAB, HORIZON_END, config)
    alone = [
        rollout(twin, sequences, VOCAB, HORIZON_END, replace(config, seed=5 + i))
        for i, twin in enumerate(twins)
    ]
    assert pooled.samples == 60 and pooled.n_paths == 180
    for name in ("path_transactions", "path_spend"):
        side_by_side = np.concatenate([getattr(one, name) for one in alone], axis=1)
        np.testing.assert_array_equal(getattr(pooled, name), side_by_side)
    for column in ("expected_count", "expected_spend", "expected_transactions", "p_active", "p_alive"):
        mean = (alone[0].summary[column] + alone[1].summary[column]) / 2
        np.testing.assert_allclose(pooled.summary[column], mean, rtol=1e-9, err_msg=column)
    counts = alone[1].paths.groupby(["customer_id", "sample"]).size()
    assert pooled.paths["sample"].max() == 30 + counts.index.get_level_values("sample").max()
    second = pooled.paths[pooled.paths["sample"] >= 30].assign(sample=lambda f: f["sample"] - 30)
    pd.testing.assert_frame_equal(second.reset_index(drop=True), alone[1].paths)
    per_path = pooled.paths.groupby(["customer_id", "sample"]).size()
    for customer in sequences.customer_ids:
        paths = per_path.get(customer, pd.Series(dtype=int)).reindex(range(60), fill_value=0)
        assert pooled.summary.loc[customer, "count_q90"] == pytest.approx(paths.quantile(0.9))
    np.testing.assert_allclose(
        pooled.daily_transactions,
        (alone[0].daily_transactions + alone[1].daily_transactions) / 2,
        rtol=1e-9,
    )


def test_dates_only_sources_get_hour_zero() -> None:
    calendar = Calendar(START, 3, torch.device("cpu"), dates_only=True)
    features = calendar.features(torch.tensor([0.75, 1.5], dtype=torch.float64))
    assert features["hour"].tolist() == [0, 0]
    assert features["day_of_week"].tolist() == [0, 1]  # 2024-04-01 is a Monday
    assert features["day_of_month"].tolist() == [1, 2]
    hours = Calendar(START, 3, torch.device("cpu"), dates_only=False)
    assert hours.features(torch.tensor([0.75, 1.5], dtype=torch.float64))["hour"].tolist() == [
        18,
        12,
    ]


def test_horizon_before_the_cutoff_is_refused() -> None:
    sequences = SPEC.sequences(history_events([1.0]), CUTOFF)
    with pytest.raises(FintwinInputError, match="not after the cut-off"):
        rollout(build_twin(), sequences, VOCAB, "2024-03-31")
