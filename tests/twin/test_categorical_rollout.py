"""Categorical features in rollouts and what-if scenarios: generated events hold the
customer's latest value; an injected event may set another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.data.features import OOV_ID, PAD_ID, FeaturiserSpec, Vocab
from fintwin.models.module import TwinModule
from fintwin.twin.rollout import ForcedEvents, RolloutConfig, rollout
from fintwin.twin.whatif import check_what_if, forced_events, inject_history, read_what_if
from tests.twin.conftest import (
    CUTOFF,
    HORIZON_DAYS,
    SCALING,
    START,
    TINY_ENCODERS,
    VOCAB,
    KnownHeads,
    fix_heads,
    history_events,
)

HORIZON_END = "2024-04-30"
CHANNELS = Vocab(("branch", "card", "online"))  # ids: branch 2, card 3, online 4
SPEC = FeaturiserSpec(vocab=VOCAB, horizon_days=HORIZON_DAYS, max_len=64,
                      categorical_features=("channel",), categorical_vocabs=(CHANNELS,))
LAST_CHANNELS = ["card", "online", "branch"]  # of customers c0, c1, c2


def _twin(encoder: str) -> TwinModule:
    torch.manual_seed(0)
    model = TwinModule(dict(TINY_ENCODERS[encoder]), vocab_size=VOCAB.size, scaling=SCALING,
                       horizon_days=HORIZON_DAYS, categorical_sizes=list(SPEC.categorical_sizes))
    return fix_heads(model.eval(), KnownHeads(gap_median=3.0, p_dormant=0.0))


def _events() -> pd.DataFrame:
    events = history_events([1.0, 2.0, 3.0])
    last = events.groupby("customer_id").cumcount(ascending=False) == 0
    channel = np.where(last, np.repeat(LAST_CHANNELS, 3), "branch")
    return events.assign(channel=channel)


def _stepped_channels(model: TwinModule, monkeypatch) -> list[torch.Tensor]:
    """Records the categorical input of every encoder step."""
    seen = []
    step = model.encoder.step

    def spy(event, state):
        seen.append(event["categorical"].clone())
        return step(event, state)

    monkeypatch.setattr(model.encoder, "step", spy)
    return seen


@pytest.mark.parametrize("encoder", sorted(TINY_ENCODERS))
def test_generated_events_hold_the_last_value(encoder, monkeypatch):
    model = _twin(encoder)
    seen = _stepped_channels(model, monkeypatch)
    config = RolloutConfig(samples=4, seed=1, chunk_customers=1)  # one chunk per customer
    rollout(model, SPEC.sequences(_events(), CUTOFF), VOCAB, HORIZON_END, config)
    held = {int(value): customer
            for customer, value in enumerate(CHANNELS.encode(np.array(LAST_CHANNELS)))}
    customers = []
    for values in seen:  # every path of a step holds its customer's last value
        assert values.shape[1] == 1 and len(set(values[:, 0].tolist())) == 1
        customers.append(held[int(values[0, 0])])
    assert customers == sorted(customers) and set(customers) == {0, 1, 2}  # chunk by chunk


def test_an_injected_value_is_held_by_the_later_events(monkeypatch):
    model = _twin("lstm")
    seen = _stepped_channels(model, monkeypatch)
    sequences = SPEC.sequences(_events(), CUTOFF)
    forced = ForcedEvents.empty(3, 2, 0, 1)
    forced.time[0] = [5.0, 12.0]
    forced.event_type[0] = VOCAB.encode(np.array(["card", "card"]))
    forced.categorical[0, :, 0] = [CHANNELS.encode(np.array(["online"]))[0], PAD_ID]
    config = RolloutConfig(samples=1, seed=2, chunk_customers=1, keep_paths=True)
    result = rollout(model, sequences, VOCAB, HORIZON_END, config, forced)
    paths = result.paths[result.paths["customer_id"] == "c0"].reset_index(drop=True)
    first = int(np.flatnonzero(paths["injected"])[0])  # the injection at day 5
    card, online = CHANNELS.encode(np.array(["card", "online"]))
    # c0's steps (one per event of its path): the generated events before day 5 hold card,
    # then online from the injection on, also through the second injection, which sets none
    c0 = [int(values[0, 0]) for values in seen[: len(paths)]]
    assert c0 == [card] * first + [online] * (len(paths) - first)
    assert paths["injected"].sum() == 2 and len(paths) - first > 2


def test_what_if_rows_set_or_keep_the_categorical_value(tmp_path: Path):
    path = tmp_path / "what_if.csv"
    path.write_text(
        "customer_id,timestamp,event_type,amount,Channel\n"
        "c0,2024-04-05,card,5,online\n"
        "c0,2024-04-06,card,5,\n"
        "c1,2024-04-07,card,5,atm\n"
    )
    rows = read_what_if(path, SPEC)
    assert rows["channel"].isna().tolist() == [False, True, False]
    rows = rows.assign(customer=[0, 0, 1])
    forced = forced_events(rows, 3, START, SPEC)
    online = CHANNELS.encode(np.array(["online"]))[0]
    assert forced.categorical[:2, :, 0].tolist() == [[online, PAD_ID], [OOV_ID, PAD_ID]]
    assert forced.categorical.shape == (3, 2, 1)

    plain = check_what_if(pd.DataFrame({"customer_id": ["c2"], "timestamp": ["2024-03-31 12:00"],
                                        "event_type": ["card"], "amount": [1.0]}), SPEC)
    assert plain["channel"].isna().all()
    history = inject_history(_events(), plain, SPEC, CUTOFF)
    assert history[history["customer_id"] == "c2"]["channel"].iloc[-1] == "branch"  # c2's last
