"""Early warnings of live twins (fintwin.live.alerts), on SQLite and a real Redis server.

The end-to-end tests use a twin with a known predictive distribution: a small LSTM whose
heads ignore the hidden state (zero weights) and whose biases hold the tiny event table's
own type frequencies, log-amount and log-gap statistics, with ``churn_prob`` fixed at
``CHURN``. Its step graph is exported and run by ``LiveTwins`` exactly as the live model
runs it, so an event's alerts come from the stored predictions before it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.cli import main
from fintwin.data.features import FEATURISER_KEY, FeaturiserSpec, Scaling, Vocab
from fintwin.errors import FintwinInputError
from fintwin.export.triton_repo import CONFIG_NAME, format_model_config, read_model_config
from fintwin.live.alerts import (
    CHURN_RISK,
    CHURN_STATE,
    OVERDUE,
    PARTS,
    UNUSUAL_EVENT,
    AlertConfig,
    combined_tail,
    event_alerts,
    stored_alerts,
    sweep,
)
from fintwin.live.events import read_events
from fintwin.live.repository import export_step_graph, live_metadata, write_live_model
from fintwin.live.store import AlertRecord, open_store
from fintwin.live.triton_model import ALERTS_OUTPUT, TAILS_OUTPUT, LiveModel
from fintwin.live.twins import LiveTwins, open_live_twins
from fintwin.models.checkpoint import TrainedTwin
from fintwin.models.module import QUANTILE_LEVELS, TwinModule
from tests.conftest import make_events

MODEL, LIVE = "twin", "twin_live"
CHURN = 0.7  # the known twin's churn probability after every event
COMPONENTS = 2


def known_twin(events: pd.DataFrame) -> TrainedTwin:
    """A twin whose predictive distribution is the table's own (see the module docstring);
    an unknown event type gets probability ~1e-9."""
    torch.manual_seed(0)
    vocab = Vocab.fit(events["event_type"])
    log_amount = np.log(events["amount"].to_numpy())
    gaps = events.groupby("customer_id")["timestamp"].diff().dt.total_seconds().dropna() / 86400
    log_gap = np.log(gaps.to_numpy())
    scaling = Scaling(float(log_amount.mean()), 1.0, 1.0, 1.0, float(log_gap.mean()), 1.0)
    model = TwinModule(encoder={"name": "lstm", "hidden_size": 8, "num_layers": 1},
                       vocab_size=vocab.size, scaling=scaling.to_dict(), horizon_days=30.0,
                       n_components=COMPONENTS).eval()
    frequency = events["event_type"].value_counts(normalize=True)
    type_bias = np.full(vocab.size, -20.0)
    type_bias[2:] = np.log(frequency[list(vocab.tokens)].to_numpy())
    by_type = events.assign(log_amount=log_amount).groupby("event_type")["log_amount"]
    amount_bias = np.zeros((3, vocab.size))
    amount_bias[0] = -20.0  # no zero amounts
    amount_bias[1, 2:] = by_type.mean()[list(vocab.tokens)].to_numpy() - log_amount.mean()
    amount_bias[2] = math.log(log_amount.std())
    time_bias = np.concatenate([np.zeros(COMPONENTS), np.zeros(COMPONENTS),
                                np.full(COMPONENTS, math.log(log_gap.std())), [-4.0]])
    with torch.no_grad():
        for head, bias in ((model.type_head, type_bias), (model.amount_head, amount_bias.ravel()),
                           (model.time_head, time_bias), (model.churn_head, [math.log(CHURN / (1 - CHURN))])):
            head.linear.weight.zero_()
            head.linear.bias.copy_(torch.tensor(np.asarray(bias), dtype=torch.float32))
    spec = FeaturiserSpec(vocab, max_len=64, horizon_days=30.0, scaling=scaling)
    return TrainedTwin(model, spec, {"source": "test", "cutoff": "2024-07-19",
                                     "observation_end": "2024-07-19", "simulator": None})


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    return make_events(n_customers=30, seed=3)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, history) -> Path:
    """A repository holding the known twin's live model (step graph and config)."""
    twin = known_twin(history)
    scratch = tmp_path_factory.mktemp("scratch")
    graph, _, step = export_step_graph(twin, scratch)
    repo = tmp_path_factory.mktemp("alerts") / "repo"
    metadata = {FEATURISER_KEY: twin.spec.to_dict(), "quantiles": list(QUANTILE_LEVELS)}
    write_live_model(repo, MODEL, twin.spec, graph, live_metadata(metadata, step), scratch)
    return repo


def columns(rows: list[tuple[str, str, str, float]]) -> dict[str, np.ndarray]:
    names = ("customer_id", "timestamp", "event_type")
    out = {name: np.array([row[i] for row in rows], dtype=object) for i, name in enumerate(names)}
    return out | {"amount": np.array([row[3] for row in rows], dtype=np.float32)}


def history_rows(history: pd.DataFrame, source: str, customer: str) -> list[tuple]:
    own = history[history["customer_id"] == source]
    return [(customer, t.isoformat(), kind, float(a))
            for t, kind, a in zip(own["timestamp"], own["event_type"], own["amount"], strict=True)]


def apply(twins: LiveTwins, rows: list[tuple]):
    """The answers of ``rows``, in request order (``LiveTwins`` answers in its sorted order)."""
    events = read_events(columns(rows), twins.spec)
    answers = twins.apply(events)
    order = np.argsort(events.rows)
    answers.alerts = [answers.alerts[i] for i in order]
    answers.status, answers.tails = answers.status[order], answers.tails[order]
    return answers


# ------------------------------------------------------------------ thresholds
def test_thresholds_are_checked_and_read_from_the_live_models_config(repo, tmp_path):
    config = read_model_config(repo / LIVE)
    assert config.parameters["alert_churn_on"].string_value == repr(AlertConfig().churn_on)
    config.parameters["alert_unusual_tail"].string_value = "0.05"
    (repo / LIVE / CONFIG_NAME).write_text(format_model_config(config))
    with open_store(f"sqlite:///{tmp_path / 'twins.db'}") as store:
        assert open_live_twins(repo, LIVE, store).alerts.unusual_tail == 0.05
    parameters = {"alert_churn_on": {"string_value": "0.3"}}  # below churn_off's 0.4
    with pytest.raises(FintwinInputError, match="alert_churn_off=0.4 must be below alert_churn_on=0.3"):
        AlertConfig.from_parameters(parameters, "config.pbtxt")
    with pytest.raises(FintwinInputError, match="config.pbtxt: parameter alert_overdue_level='x'"):
        AlertConfig.from_parameters({"alert_overdue_level": {"string_value": "x"}}, "config.pbtxt")
    with pytest.raises(FintwinInputError, match="alert_unusual_tail=1.5: expected a number"):
        AlertConfig(unusual_tail=1.5)


# ------------------------------------------------------------------ churn_risk
def test_churn_risk_hysteresis_does_not_flap():
    """A churn probability hovering around the on-threshold raises one alert; only after it
    fell below the off-threshold does a new crossing raise another."""
    config = AlertConfig(churn_on=0.6, churn_off=0.4)
    series = [0.3, 0.61, 0.59, 0.62, 0.58, 0.6, 0.45, 0.65, 0.39, 0.55, 0.7]
    state = np.zeros((1, 1), np.float32)
    raised = []
    for step, churn in enumerate(series):
        before = {CHURN_STATE: state}
        after = {"prediction:churn_prob": np.array([[churn]], np.float32)}
        event = {"event_type": np.array([2]), "amount": np.array([1.0]),
                 "gap_days": np.array([1.0]), "timestamp_ns": np.array([step * 10**9])}
        result = event_alerts(config, before, np.zeros(1, np.int64), after, event,
                              np.array(["<pad>", "<oov>", "card"]), 30.0)
        state = result.churn_state
        raised += [(step, alert["churn_prob"]) for alert in result.alerts[0]]
    assert raised == [(1, pytest.approx(0.61)), (10, pytest.approx(0.7))]


# ------------------------------------------------------------------ unusual_event
def test_fishers_combination_of_tail_probabilities():
    """Three independent uniform tails combine into a uniform one; one tiny tail dominates."""
    rng = np.random.default_rng(0)
    combined = combined_tail(rng.random((200_000, 3)))
    assert np.quantile(combined, [0.001, 0.01, 0.5]) == pytest.approx([0.001, 0.01, 0.5], rel=0.1)
    assert combined_tail(np.array([[1.0, 1.0, 1.0], [1e-9, 1.0, 1.0]])) == pytest.approx(
        [1.0, 1e-9 * (1 + 9 * np.log(10) + (9 * np.log(10)) ** 2 / 2)])


def test_an_obviously_unusual_event_alerts_and_an_ordinary_one_does_not(repo, history, tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'twins.db'}") as store:
        twins = open_live_twins(repo, LIVE, store)
        busiest = history["customer_id"].value_counts().index[0]
        own = history[history["customer_id"] == busiest]
        apply(twins, history_rows(history, busiest, "ordinary")
              + history_rows(history, busiest, "odd"))
        gap = float(np.median(np.diff(own["timestamp"].to_numpy()) / np.timedelta64(1, "D")))
        when = (own["timestamp"].max() + pd.Timedelta(days=gap)).isoformat()
        typical = own["event_type"].mode()[0]
        median_amount = float(np.exp(np.log(history.loc[history["event_type"] == typical,
                                                         "amount"]).mean()))
        answers = apply(twins, [("ordinary", when, typical, median_amount),
                                ("odd", when, "crypto_exchange", 10 * float(own["amount"].max()))])
    ordinary, odd = 0, 1
    assert answers.alerts[ordinary] == [] and (answers.tails[ordinary] > 0.1).all()
    (alert,) = [a for a in answers.alerts[odd] if a["kind"] == UNUSUAL_EVENT]
    assert alert["unusual"] == ["type", "amount"]
    assert alert["tails"]["type"] < 1e-6 and alert["tails"]["amount"] < 1e-3
    tails = np.array([[alert["tails"][part] for part in PARTS]])
    assert alert["tail_probability"] == pytest.approx(combined_tail(tails)[0])
    assert alert["tail_probability"] < min(alert["tails"].values())
    assert alert["seq"] == len(own) + 1
    assert alert["inputs"]["event_type"] == "<oov>"
    assert alert["inputs"]["amount"] == pytest.approx(10 * own["amount"].max(), rel=1e-6)
    assert "odd" not in json.dumps(alert)  # the record names no customer


# ------------------------------------------------------------------ overdue
def test_the_overdue_sweep_finds_a_silent_customer_and_not_an_active_one(repo, history, store_url):
    now = pd.Timestamp("2024-09-01")
    recent = [("active", (now - pd.Timedelta(hours=h)).isoformat(), "card", 20.0)
              for h in (60, 40, 20)]
    silent = [("silent", (now - pd.Timedelta(days=d)).isoformat(), "card", 20.0)
              for d in (200, 199, 198)]
    with open_store(store_url) as store:
        twins = open_live_twins(repo, LIVE, store)
        apply(twins, recent + silent)
        found = list(sweep(store, LIVE, 1, twins.alerts, now.value))
        assert [o.customer_key for o in found] == [store.customer_key("silent")]
        alert = found[0].alert
        assert alert["kind"] == OVERDUE and alert["seq"] == 3
        assert alert["silence_days"] == pytest.approx(198.0)
        assert alert["quantile_days"] < alert["silence_days"]
        assert list(sweep(store, LIVE, 1, twins.alerts, now.value + 10**12)) == []  # once
        stored = [a for a in stored_alerts(store, LIVE, 1, ["silent"]) if a["kind"] == OVERDUE]
        assert stored == [alert | {"customer_key": store.customer_key("silent")}]


# ------------------------------------------------------------------ stored alerts
def test_alerts_are_stored_with_the_state_and_survive_a_restart(repo, history, store_url):
    rows = history_rows(history, history["customer_id"].value_counts().index[0], "c007")
    with open_store(store_url) as store:
        twins = open_live_twins(repo, LIVE, store)
        first = apply(twins, rows[:3])
        assert [a["kind"] for a in first.alerts[0]] == [CHURN_RISK]  # churn_prob 0.7 >= 0.6
        assert first.alerts[1] == first.alerts[2] == []  # the alert stays on: no repeat
    with open_store(store_url) as store:  # a restarted live model
        twins = open_live_twins(repo, LIVE, store)
        later = apply(twins, rows[3:5])
        assert not any(a["kind"] == CHURN_RISK for alerts in later.alerts for a in alerts)
        stored = stored_alerts(store, LIVE, 1, ["c007"])
        churn = [a for a in stored if a["kind"] == CHURN_RISK]
        assert churn == [first.alerts[0][0] | {"customer_key": store.customer_key("c007")}]
        assert churn[0]["inputs"]["churn_prob"] == pytest.approx(CHURN, abs=1e-6)
        assert store.get(LIVE, 1, ["c007"]).states["c007"].arrays[CHURN_STATE][0] == 1.0


def test_refused_events_store_no_alerts(repo, history, tmp_path):
    """An out-of-order event changes nothing: no alert is answered or stored for it."""
    rows = history_rows(history, "c001", "c001")
    with open_store(f"sqlite:///{tmp_path / 'twins.db'}") as store:
        twins = open_live_twins(repo, LIVE, store)
        apply(twins, rows)
        before = store.alerts(LIVE, 1)
        late = apply(twins, [("c001", rows[0][1], "crypto_exchange", 1e9)])
        assert late.status[0].startswith("out-of-order") and late.alerts[0] == []
        assert np.isnan(late.tails[0]).all() and store.alerts(LIVE, 1) == before


def test_store_lists_states_and_keeps_the_first_record_of_an_alert(repo, history, store_url):
    with open_store(store_url) as store:
        twins = open_live_twins(repo, LIVE, store)
        rows = [(f"k{i:02d}", "2024-05-01T00:00:00", "card", 10.0) for i in range(25)]
        apply(twins, rows)
        batches = list(store.states(LIVE, 1, [CHURN_STATE], batch=10))
        assert sorted(len(b) for b in batches) == [5, 10, 10]
        keys = [store.customer_key(row[0]) for row in rows]
        assert sorted(key for b in batches for key in b.keys) == sorted(keys)
        assert all((b.seq == 1).all() and set(b.arrays) == {CHURN_STATE} for b in batches)
        stored = store.get(LIVE, 1, ["k03"]).states["k03"]
        (listed,) = [b for b in store.states(LIVE, 1) if keys[3] in b.keys]
        row = listed.keys.index(keys[3])
        assert listed.timestamp_ns[row] == stored.timestamp_ns
        for name, value in stored.arrays.items():
            np.testing.assert_array_equal(listed.arrays[name][row], value)
        with pytest.raises(FintwinInputError, match="state fields \\['nope'\\]: not in the layout"):
            next(store.states(LIVE, 1, ["nope"]))
        first, again = (AlertRecord(keys[0], 1, OVERDUE, '{"n": 1}'),
                        AlertRecord(keys[0], 1, OVERDUE, '{"n": 2}'))
        assert store.record_alerts(LIVE, 1, [first]) == [True]
        assert store.record_alerts(LIVE, 1, [again]) == [False]
        assert [a.record for a in store.alerts(LIVE, 1, ["k00"]) if a.kind == OVERDUE] == ['{"n": 1}']
        store.delete_version(LIVE, 1)
        assert store.alerts(LIVE, 1) == []


def test_a_live_model_exported_without_alert_fields_is_refused(repo, tmp_path):
    version = repo / LIVE / "1"
    metadata = json.loads((version / "fintwin.json").read_text())
    metadata["step"].pop("distribution")
    old = tmp_path / "old"
    old.mkdir()
    for path in version.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    (old / "fintwin.json").write_text(json.dumps(metadata))
    with open_store(f"sqlite:///{tmp_path / 'twins.db'}") as store, \
            pytest.raises(FintwinInputError, match="export the model again"):
        LiveTwins(old, store, LIVE, 1)


def test_fintwin_live_sweep_emits_overdue_customers_once(repo, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'twins.db'}"
    with open_store(url) as store:
        apply(open_live_twins(repo, LIVE, store),
              [("quiet", "2024-01-01T00:00:00", "card", 20.0),
               ("quiet", "2024-01-02T00:00:00", "card", 20.0)])
    out = tmp_path / "overdue.jsonl"
    command = ["live", "sweep", "--repo", str(repo), "--model", MODEL, "--store", url,
               "--as-of", "2025-06-01T00:00:00+02:00", "--out", str(out)]
    assert main(command) == 0
    assert main(command) == 0  # the same silence: nothing new
    (line,) = out.read_text().splitlines()
    alert = json.loads(line)
    with open_store(url) as store:
        assert alert["customer_key"] == store.customer_key("quiet") and alert["kind"] == OVERDUE
    assert alert["as_of"].startswith("2025-05-31T22:00:00") and alert["seq"] == 2
    assert "1 new overdue" in capsys.readouterr().err
    assert main([*command[:-4], "--as-of", "yesterday"]) == 2
    assert "--as-of 'yesterday': not a timestamp" in capsys.readouterr().err


def test_the_live_model_answers_alerts_and_tail_probabilities(repo, history, tmp_path):
    """The Triton live model's rows: ``alerts`` (JSON) and ``event_tail_probs`` [3]."""
    rows = history_rows(history, history["customer_id"].value_counts().index[0], "c1")
    rows.append(("c1", "2024-12-01T00:00:00", "crypto_exchange", 1e7))
    with open_store(f"sqlite:///{tmp_path / 'twins.db'}") as store:
        twins = open_live_twins(repo, LIVE, store)
        request = {name: value.reshape(-1, 1) for name, value in columns(rows).items()}
        request = {name: (value.astype(bytes) if value.dtype == object else value)
                   for name, value in request.items()}
        (result,) = LiveModel(twins).answer([request])
    alerts = [json.loads(value) for value in result[ALERTS_OUTPUT][:, 0]]
    assert [a["kind"] for a in alerts[0]] == [CHURN_RISK]
    assert np.isnan(result[TAILS_OUTPUT][0]).all() and result[TAILS_OUTPUT].shape == (len(rows), 3)
    (odd,) = [a for a in alerts[-1] if a["kind"] == UNUSUAL_EVENT]
    served = dict(zip(PARTS, result[TAILS_OUTPUT][-1].tolist(), strict=True))
    assert odd["tails"] == pytest.approx(served, rel=1e-6)
