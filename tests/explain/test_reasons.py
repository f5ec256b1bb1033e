"""Reasons from attributions: a hand-made history whose driver is obvious gets it as the first
reason, in words; every group is counted once, so the groups add up to the attributions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fintwin.data.features import Vocab
from fintwin.explain.attribution import SUMMARY_FEATURES
from fintwin.explain.reasons import CustomerAttributions, noun, rank_reasons

FIELDS = ["type", "amount", "gap", "calendar"]
VOCAB = Vocab.fit(np.array(["card_payment", "cash_withdrawal", "salary"]))
AS_OF = pd.Timestamp("2024-06-01")


def history() -> pd.DataFrame:
    """Monthly salaries until March, card payments throughout, then four cash withdrawals in
    the last 30 days (80 each) and a 20-day gap before the first of them."""
    rows = [(f"2024-0{m}-01", "salary", 2500.0) for m in (1, 2, 3)]
    rows += [(f"2024-0{m}-{d:02d}", "card_payment", 40.0) for m in (1, 2, 3, 4) for d in (10, 20)]
    rows += [(f"2024-05-{d:02d}", "cash_withdrawal", 80.0) for d in (10, 15, 20, 25)]
    events = pd.DataFrame(rows, columns=["timestamp", "event_type", "amount"])
    events["timestamp"] = pd.to_datetime(events["timestamp"])
    events = events.sort_values("timestamp", ignore_index=True)
    events["gap_days"] = events["timestamp"].diff().dt.total_seconds().fillna(0.0) / 86_400
    events["type_id"] = VOCAB.encode(events["event_type"].to_numpy())
    return events


def attributions(events: pd.DataFrame) -> np.ndarray:
    """Small contributions everywhere; each cash withdrawal's type +0.05 and amount +0.01, the
    20-day gap before the first of them +0.02."""
    values = np.full((len(events), len(FIELDS)), 0.001)
    cash = (events["event_type"] == "cash_withdrawal").to_numpy()
    values[cash, 0] = 0.05
    values[cash, 1] = 0.01
    values[np.argmax(cash), 2] = 0.02
    return values


def data(silence: float = 0.0) -> CustomerAttributions:
    events = history()
    recency = np.zeros(VOCAB.size)
    recency[VOCAB.to_dict()["salary"]] = 0.08
    recency[VOCAB.to_dict()["card_payment"]] = -0.002
    summary = dict(zip(SUMMARY_FEATURES, [-0.03, 0.01, 0.0, 0.0, 0.004], strict=True))
    return CustomerAttributions(events, FIELDS, attributions(events), VOCAB.labels(), recency,
                                summary, silence, AS_OF)


def test_the_obvious_driver_comes_first_in_words():
    reasons = rank_reasons(data())
    assert [r.text for r in reasons] == [
        "4 cash withdrawals in the last 30 days (320.00 in total)",
        "no salary since 2024-03-01 (85 days before the last event)",
        "15 events in the history",
        "a gap of 20 days before 2024-05-10",
    ]
    assert [r.rank for r in reasons] == [1, 2, 3, 4]
    assert reasons[0].contribution == pytest.approx(4 * (0.05 + 0.01 + 0.001))
    assert reasons[0].kind == "events" and reasons[0].direction == "raises"
    assert reasons[2].direction == "lowers" and reasons[2].kind == "history"


def test_groups_add_up_to_every_attribution():
    customer = data(silence=0.3)
    reasons = rank_reasons(customer, top=100)
    total = (customer.attributions.sum() + customer.recency.sum() + sum(customer.summary.values())
             + customer.silence)
    assert sum(r.contribution for r in reasons) == pytest.approx(total)
    assert reasons[0].text == "silence of 7.0 days since 2024-05-25"
    texts = [r.text for r in reasons]
    assert "4 card payments 31-90 days ago (160.00 in total)" in texts  # by window
    assert "4 card payments more than 90 days ago (160.00 in total)" in texts
    assert "7 events more than 90 days ago, a median gap of 10 days" in texts
    assert "a customer for 145 days (since 2024-01-01)" in texts


@pytest.mark.parametrize(("word", "count", "plural"), [
    ("salary", 2, "salaries"), ("cash_withdrawal", 4, "cash withdrawals"), ("day", 3, "days"),
    ("purchase", 1, "purchase"), ("loss", 2, "loss")])
def test_nouns(word, count, plural):
    assert noun(word, count) == plural
