"""The simulator's known truth: labelled anomalies and each customer's dormancy onset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fintwin.data.features import FeaturiserSpec, Vocab
from fintwin.data.simulator import (
    ANOMALY_COLUMN,
    EVENT_TYPES,
    SimulatorConfig,
    simulate,
    simulate_world,
)

RATE = 0.05


@pytest.fixture(scope="module")
def world():
    return simulate_world(SimulatorConfig(n_customers=400, seed=3, anomaly_rate=RATE))


def test_anomalies_are_foreign_events_inserted_into_the_customers_own_stream(world):
    events = world.events
    own = events[~events[ANOMALY_COLUMN]].drop(columns=ANOMALY_COLUMN).reset_index(drop=True)
    plain = simulate(SimulatorConfig(n_customers=400, seed=3))
    pd.testing.assert_frame_equal(own, plain)  # the customers' own events are unchanged
    share = events[ANOMALY_COLUMN].mean()
    gaps = len(plain) - plain["customer_id"].nunique()
    assert events[ANOMALY_COLUMN].sum() == pytest.approx(RATE * gaps, rel=0.15)
    assert 0 < share < RATE
    ordered = events.groupby("customer_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing)
    assert ordered.all()
    first = events.groupby("customer_id").head(1)
    assert not first[ANOMALY_COLUMN].any()  # never before the opening event
    assert set(events.loc[events[ANOMALY_COLUMN], "event_type"]) <= set(EVENT_TYPES)


def test_the_featuriser_never_sees_the_anomaly_flag(world):
    spec = FeaturiserSpec(Vocab.fit(np.array(EVENT_TYPES)), max_len=32, horizon_days=30.0)
    read = spec.read_events(world.events)
    assert ANOMALY_COLUMN not in read.columns
    assert set(spec.event_features(read)) == {"event_type", "amount", "delta_t", "day_of_week",
                                              "day_of_month", "hour"}


def test_dormancy_onset_is_the_last_event_of_customers_who_went_dormant(world):
    customers, events = world.customers, world.events
    last = events.groupby("customer_id")["timestamp"].max()
    dormant = customers["dormant_onset"].dropna()
    assert 0.5 < len(dormant) / len(customers) < 1.0
    np.testing.assert_allclose(
        (last[dormant.index] - dormant).dt.total_seconds().abs().to_numpy(), 0.0, atol=1e-3)
    assert list(customers.columns) == ["segment", "dormant_onset"]
    assert customers.index.equals(pd.Index(sorted(last.index), name="customer_id"))


def test_the_world_without_anomalies_has_no_flag_column_and_rates_are_checked():
    assert ANOMALY_COLUMN not in simulate(SimulatorConfig(n_customers=20)).columns
    with pytest.raises(ValueError, match="anomaly_rate must lie in \\[0, 1\\], got 1.5"):
        simulate(SimulatorConfig(n_customers=20, anomaly_rate=1.5))
