"""PSI, bins, sliding windows and the watched values (fintwin.monitor.drift), and the shifted
synthetic bank flagged while a fresh draw of the same world is not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fintwin.data.features import FeaturiserSpec, Vocab
from fintwin.data.simulator import EVENT_TYPES, SimulatorConfig, simulate
from fintwin.errors import FintwinInputError
from fintwin.monitor.drift import (
    CATEGORICAL,
    NUMERIC,
    Binning,
    Reference,
    SlidingWindow,
    Thresholds,
    drift_values,
    psi,
    windowed_psi,
)
from fintwin.monitor.metrics import ModelMetrics, PrometheusSink
from fintwin.monitor.reference import history_values, reference_of


def test_identical_distributions_give_psi_zero_and_a_known_shift_its_value():
    assert psi((0.2, 0.3, 0.5), np.array([20, 30, 50])) == 0.0
    # (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5)
    assert psi((0.5, 0.5), np.array([80, 20])) == pytest.approx(0.3 * np.log(1.6) + 0.3 * np.log(2.5))
    assert np.isnan(psi((0.5, 0.5), np.array([0, 0])))
    # an empty bin counts as rare (share floor 1e-4), not as infinitely surprising
    assert np.isfinite(psi((1.0, 0.0), np.array([50, 50])))


def test_numeric_bins_are_deciles_with_point_masses_merged_and_categories_clipped():
    values = np.r_[np.zeros(500), np.arange(1, 501, dtype=float)]
    binning = Binning.fit(values, NUMERIC)
    assert binning.edges[0] == 0.0 and len(set(binning.edges)) == len(binning.edges)
    assert binning.shares[0] == 0.0 and binning.shares[1] == pytest.approx(0.5 + 0.001, abs=0.01)
    assert sum(binning.shares) == pytest.approx(1.0)
    assert binning.counts(np.array([np.nan, -1.0, 0.0, 1e9])).tolist()[:2] == [1, 1]
    weekdays = Binning.fit(np.array([0, 1, 1, 6]), CATEGORICAL, categories=7)
    assert weekdays.shares == (0.25, 0.5, 0, 0, 0, 0, 0.25)
    assert weekdays.counts(np.array([9, -2])).tolist() == [1, 0, 0, 0, 0, 0, 1]
    with pytest.raises(FintwinInputError, match="0 < watch <= act"):
        Thresholds(watch=0.3, act=0.2)


def test_watched_values_of_a_hand_made_history():
    ids = np.array(["a", "a", "a", "b"], dtype=object)
    days = np.array([0.0, 10.0, 95.0, 3.0])
    ns = (pd.Timestamp("2024-01-01").value + days * 86_400e9).astype(np.int64)
    features = {"event_type": np.array([1, 2, 1, 3]), "amount": np.array([1.0, 2.0, 3.0, 4.0]),
                "delta_t": np.array([0.0, 10.0, 85.0, 0.0]), "day_of_week": np.zeros(4),
                "day_of_month": np.ones(4), "hour": np.zeros(4)}
    values = drift_values(ids, ns, features)
    assert values["history_length"].tolist() == [1, 2, 3, 1]
    assert np.isnan(values["gap_days"][[0, 3]]).all() and values["gap_days"][2] == 85.0
    assert values["activity_90d"].tolist() == [1, 2, 2, 1]  # day 95 sees days 10 and 95


def test_sliding_window_forgets_old_events_and_counts_drifted_quantities():
    rng = np.random.default_rng(0)
    reference = Reference({"x": Binning.fit(rng.normal(size=20_000), NUMERIC)})
    window = SlidingWindow(reference, events=1000, slots=10)
    window.add({"x": rng.normal(3.0, 1.0, 1000)})  # far off
    assert window.psi()["x"] > 1.0 and window.drifted() == {"watch": 1, "act": 1}
    for _ in range(10):  # ten slots of the reference distribution push the shift out
        window.add({"x": rng.normal(size=100)})
    assert window.events == 900  # nine full slots; the tenth has just been started afresh
    assert window.psi()["x"] < 0.05 and window.drifted() == {"watch": 0, "act": 0}


def test_model_metrics_count_alerts_and_drift_into_prometheus_client():
    sink = PrometheusSink()
    reference = Reference({"x": Binning((NUMERIC), (0.0,), (0.5, 0.5))})
    metrics = ModelMetrics(sink, "twin_live", 3, SlidingWindow(reference, 100, 10))
    metrics.alerts(["churn-risk", "churn-risk", "spend-drop"])
    metrics.observe_drift({"x": np.r_[np.full(80, -1.0), np.full(20, 1.0)]}, now=10.0)
    labels = {"model": "twin_live", "version": "3"}
    value = sink.registry.get_sample_value
    assert value("fintwin_alerts_total", labels | {"kind": "churn-risk"}) == 2
    assert value("fintwin_alerts_total", labels | {"kind": "spend-drop"}) == 1
    assert value("fintwin_drift_psi", labels | {"feature": "x"}) == pytest.approx(
        0.3 * np.log(1.6) + 0.3 * np.log(2.5))
    assert value("fintwin_drifted_features", labels | {"level": "act"}) == 1
    assert value("fintwin_drift_window_events", labels) == 100


def bank(config: SimulatorConfig, end: str = "2023-01-01") -> pd.DataFrame:
    events = simulate(config)
    return events[events["timestamp"] < pd.Timestamp(end)].reset_index(drop=True)


@pytest.fixture(scope="module")
def bank_reference() -> tuple[FeaturiserSpec, Reference]:
    spec = FeaturiserSpec(Vocab.fit(np.array(EVENT_TYPES)), max_len=64, horizon_days=30.0)
    return spec, reference_of(bank(SimulatorConfig(n_customers=1500, seed=0)), spec)


def overall_psi(spec, reference, events) -> dict[str, float]:
    return reference.psi(reference.counts(history_values(events, spec)))


def test_a_fresh_draw_of_the_bank_is_stable_and_a_shifted_bank_is_flagged(bank_reference):
    spec, reference = bank_reference
    same = overall_psi(spec, reference, bank(SimulatorConfig(n_customers=1500, seed=1)))
    assert max(same.values()) < 0.1, same
    cash = EVENT_TYPES.index("cash_withdrawal")
    shifted = SimulatorConfig(n_customers=1500, seed=1)
    shifted.type_logits = [[v + 2.0 * (j == cash) for j, v in enumerate(row)]
                           for row in shifted.type_logits]
    moved = overall_psi(spec, reference, bank(shifted))
    assert moved["event_type"] >= 0.25, moved
    new_segment = SimulatorConfig(n_customers=1500, seed=1, segment_prior=[0.05, 0.05, 0.1, 0.8])
    mix = overall_psi(spec, reference, bank(new_segment))
    assert sum(v >= 0.1 for v in mix.values()) >= 3, mix  # type mix, amounts, activity


def test_windowed_psi_has_one_row_per_calendar_window(bank_reference):
    spec, reference = bank_reference
    events = bank(SimulatorConfig(n_customers=300, seed=2))
    values = history_values(events, spec)
    table = windowed_psi(reference, values, events["timestamp"].to_numpy(), "Q")
    assert table.index.tolist() == list(pd.date_range("2022-01-01", periods=4, freq="QS"))
    assert table["events"].sum() == len(events)
    assert set(reference.binnings) <= set(table.columns)
