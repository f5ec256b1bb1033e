"""The synthetic world: determinism, the event contract, its rhythm and its configuration."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fintwin.data.simulator import (
    CHANNELS,
    EVENT_TYPES,
    SimulatorConfig,
    customer_segments,
    simulate,
)

SMALL = SimulatorConfig(n_customers=400, seed=3)


# 1. determinism and the event contract ------------------------------------------------


def test_simulate_is_deterministic_per_seed_and_follows_the_contract():
    world = simulate(SMALL)
    pd.testing.assert_frame_equal(world, simulate(SMALL))
    other = simulate(dataclasses.replace(SMALL, seed=4))
    assert len(other) != len(world) or not other["amount"].equals(world["amount"])

    assert list(world.columns) == ["customer_id", "timestamp", "event_type", "amount"]
    assert world["customer_id"].map(type).eq(str).all()
    assert world["timestamp"].dtype == "datetime64[ns]"
    assert world["amount"].dtype == np.float64
    assert world.equals(world.sort_values(["customer_id", "timestamp"], kind="mergesort"))
    assert world["customer_id"].nunique() == SMALL.n_customers
    assert (world["timestamp"] >= pd.Timestamp(SMALL.start)).all()
    assert (world["timestamp"] < pd.Timestamp(SMALL.end)).all()
    assert (world["amount"] >= 0).all()
    assert (world.loc[world["event_type"] == "app_login", "amount"] == 0).all()
    assert (world.loc[world["event_type"] == "salary", "amount"] > 0).all()
    assert set(world["event_type"]) == set(EVENT_TYPES)
    first = world.groupby("customer_id").head(1)
    assert (first["event_type"] == "app_login").all()  # the account opening


def test_default_world_size_and_monthly_salary_rhythm():
    config = dataclasses.replace(SimulatorConfig(), n_customers=1000)
    events = simulate(config)
    per_customer = events.groupby("customer_id").size()
    assert 30 <= per_customer.mean() <= 80
    assert (per_customer == 1).any()
    salaried = customer_segments(config).loc[lambda s: s == "salaried"].index
    salary = events[(events["event_type"] == "salary") & events["customer_id"].isin(salaried)]
    days = salary.groupby("customer_id")["timestamp"].diff().dt.total_seconds() / 86_400
    assert 27 <= days.median() <= 35


# 2. configuration ---------------------------------------------------------------------


def test_config_is_hydra_instantiable_with_list_overrides():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.create(
        {
            "_target_": "fintwin.data.simulator.SimulatorConfig",
            "n_customers": 30,
            "gap_sigma": [0.5, 0.5, 0.5, 0.5],
            "type_logits": OmegaConf.structured(SimulatorConfig).type_logits,
        }
    )
    config = instantiate(node)
    assert isinstance(config, SimulatorConfig)
    assert simulate(config)["customer_id"].nunique() == 30


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="gap_sigma must have shape"):
        simulate(SimulatorConfig(gap_sigma=[1.0, 1.0]))
    with pytest.raises(ValueError, match="segment_prior"):
        simulate(SimulatorConfig(segment_prior=[0.5, 0.5, 0.5, 0.5]))


# 3. the categorical channel -------------------------------------------------------------

CHANNEL_WORLD = dataclasses.replace(SMALL, n_customers=1500, categorical_channel=True)


def test_channels_come_from_their_own_stream():
    """Without channel effects a world with channels is the world without, plus the column."""
    neutral = dataclasses.replace(
        SMALL,
        categorical_channel=True,
        channel_type_logits=[[0.0] * len(EVENT_TYPES)] * len(CHANNELS),
        channel_gap_shift=[0.0] * len(CHANNELS),
        channel_amount_shift=[0.0] * len(CHANNELS),
    )
    world = simulate(neutral)
    assert list(world.columns) == ["customer_id", "timestamp", "event_type", "amount", "channel"]
    pd.testing.assert_frame_equal(world.drop(columns="channel"), simulate(SMALL))
    assert set(world["channel"]) == set(CHANNELS)
    pd.testing.assert_frame_equal(world, simulate(neutral))


def test_the_channel_shifts_the_next_amount_and_type():
    world = simulate(CHANNEL_WORLD)
    following = world.groupby("customer_id").shift(-1)
    paid = following["amount"] > 0
    log_amount = np.log(following["amount"][paid]).groupby(world["channel"][paid]).mean()
    # channel_amount_shift 0 / 0.3 / 0.8 on the log scale, mixed over types and customers
    assert log_amount["online"] - log_amount["card"] > 0.5
    assert log_amount["branch"] - log_amount["online"] > 0.5
    next_type = pd.crosstab(world["channel"], following["event_type"], normalize="index")
    assert next_type.loc["branch", "cash_withdrawal"] > 2 * next_type.loc["card", "cash_withdrawal"]
    assert next_type.loc["card", "card_payment"] > 2 * next_type.loc["online", "card_payment"]
    shares = world.groupby("customer_id")["channel"].agg(lambda c: (c == "card").mean())
    busy = world.groupby("customer_id").size() >= 30
    assert shares[busy].std() > 0.15  # propensities are the customer's own


def test_channel_config_validation_names_the_field():
    with pytest.raises(ValueError, match="channel_probs must be positive"):
        simulate(dataclasses.replace(CHANNEL_WORLD, channel_probs=[[0.5, 0.5, 0.0]] * 4))
    with pytest.raises(ValueError, match="channel_gap_shift must have shape"):
        simulate(dataclasses.replace(CHANNEL_WORLD, channel_gap_shift=[0.0]))
