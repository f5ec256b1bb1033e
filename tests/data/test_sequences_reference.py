"""build_sequences against a straightforward per-customer, per-event reference: bit for bit
in the dtypes batches hand out (the sequence set keeps ids and calendar fields narrower)."""

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.data import features, sequences
from fintwin.data.features import NS_PER_DAY, OOV_ID, FeaturiserSpec, Vocab
from fintwin.data.schema import EventSchema, validate_events
from fintwin.data.sequences import TARGETS, build_sequences
from fintwin.errors import FintwinInputError

CUTOFF = "2024-03-31"  # observation ends at 2024-04-01 00:00
HORIZON = 30.0
SPEC = FeaturiserSpec(
    Vocab(("card", "salary", "transfer")),
    max_len=5,
    horizon_days=HORIZON,
    numeric_features=("balance",),
    categorical_features=("channel",),
    categorical_vocabs=(Vocab(("atm", "online")),),
)


def random_table(seed: int = 0) -> pd.DataFrame:
    """Validated events of 40 customers: 1 to 12 events each, shuffled before validation,
    with same-instant ties, an unknown type and channel, events after the cut-off (two
    customers have only those) and a customer active across 1970-01-01."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(40):
        n = 1 if c % 7 == 0 else int(rng.integers(1, 13))
        first = pd.Timestamp("2023-11-15") + pd.Timedelta(days=float(rng.uniform(0, 120)))
        if c in (5, 6):
            first = pd.Timestamp("2024-04-02")
        if c == 9:
            first = pd.Timestamp("1969-12-20 13:30")
        gaps = rng.exponential(8.0, n) * (rng.random(n) > 0.2)  # a fifth are ties
        for t in first + pd.to_timedelta(np.cumsum(gaps), unit="D"):
            rows.append(
                (
                    f"c{c:02d}",
                    t.floor("s"),
                    rng.choice(["card", "salary", "transfer", "crypto"]),
                    round(float(rng.lognormal(3, 1)), 2) * (rng.random() > 0.3),
                    float(rng.normal(0, 100)),
                    rng.choice(["atm", "online", "branch"]),
                )
            )
    table = pd.DataFrame(
        rows, columns=["customer_id", "timestamp", "event_type", "amount", "balance", "channel"]
    )
    table = table.sample(frac=1.0, random_state=seed)
    return validate_events(
        table, EventSchema(numeric_features=["balance"], categorical_features=["channel"])
    )[0]


def days(ns: int) -> np.float64:
    """Nanoseconds as float64 days, with numpy's arithmetic."""
    return np.int64(ns) / NS_PER_DAY


def reference(events: pd.DataFrame, spec: FeaturiserSpec, cutoff: str) -> dict[str, np.ndarray]:
    """Features and targets of each customer's calibration events, event by event."""
    end = pd.Timestamp(cutoff) + pd.Timedelta(days=1)
    end_days = days(end.value)
    types, channels = spec.vocab.to_dict(), spec.categorical_vocabs[0].to_dict()
    out = {name: [] for name in (*features_names(), *TARGETS, "length", "customer")}
    for customer, group in events[events["timestamp"] < end].groupby("customer_id", sort=True):
        ns = group["timestamp"].to_numpy().view(np.int64)
        type_id = [types.get(t, OOV_ID) for t in group["event_type"]]
        amount = group["amount"].to_numpy().astype(np.float32)
        delta = [np.float32(0.0 if i == 0 else days(ns[i] - ns[i - 1])) for i in range(len(ns))]
        n = len(ns)
        for i in range(max(0, n - spec.max_len), n):
            stamp, last = pd.Timestamp(ns[i]), i == n - 1
            elapsed = end_days - days(ns[i])
            next_gap = np.float32(elapsed) if last else delta[i + 1]
            values = {
                "event_type": type_id[i],
                "amount": amount[i],
                "delta_t": delta[i],
                "day_of_week": stamp.dayofweek,
                "day_of_month": stamp.day,
                "hour": stamp.hour,
                "numeric": [np.float32(group["balance"].iloc[i])],
                "categorical": [channels.get(group["channel"].iloc[i], OOV_ID)],
                "next_type": 0 if last else type_id[i + 1],
                "next_gap": next_gap,
                "next_amount": np.float32(0.0) if last else amount[i + 1],
                "gap_censored": last,
                "churn_label": np.float32(next_gap > np.float32(spec.horizon_days)),
                "churn_mask": not last or elapsed >= spec.horizon_days,
                "horizon_mask": days(ns[i]) + spec.horizon_days <= end_days,
            }
            for name, value in values.items():
                out[name].append(value)
        out["length"].append(min(n, spec.max_len))
        out["customer"].append(customer)
    dtypes = {
        "amount": np.float32,
        "delta_t": np.float32,
        "numeric": np.float32,
        "next_gap": np.float32,
        "next_amount": np.float32,
        "churn_label": np.float32,
        "gap_censored": bool,
        "churn_mask": bool,
        "horizon_mask": bool,
        "customer": str,
    }
    return {name: np.array(v, dtype=dtypes.get(name, np.int64)) for name, v in out.items()}


def features_names() -> tuple[str, ...]:
    return (
        "event_type",
        "amount",
        "delta_t",
        "day_of_week",
        "day_of_month",
        "hour",
        "numeric",
        "categorical",
    )


def assert_identical(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert actual.tobytes() == expected.tobytes(), name


@pytest.mark.parametrize("chunk", [3, 7, 1 << 17])
@pytest.mark.parametrize("seed", [0, 1])
def test_build_sequences_equals_reference_bit_for_bit(monkeypatch, chunk, seed):
    monkeypatch.setattr(features, "CHUNK_EVENTS", chunk)
    monkeypatch.setattr(sequences, "CHUNK_EVENTS", chunk)
    events = random_table(seed)
    expected = reference(events, SPEC, CUTOFF)
    seq = build_sequences(events, SPEC, cutoff=CUTOFF)

    assert len(seq) == 38  # two customers have no calibration event
    assert (expected["length"] == 1).sum() >= 5 and (expected["length"] == SPEC.max_len).any()
    assert (expected["event_type"] == OOV_ID).any() and (expected["delta_t"] == 0).sum() > 38
    assert_identical(seq.customer_ids, expected["customer"], "customer_ids")
    assert_identical(seq.lengths, expected["length"], "lengths")
    assert_identical(seq.starts, np.cumsum(expected["length"]) - expected["length"], "starts")
    flat = seq.at(np.arange(seq.n_events), (*features_names(), *TARGETS))
    batch = seq.batch(np.arange(len(seq)))
    real = np.arange(batch["event_type"].shape[1])[None, :] < seq.lengths[:, None]
    for name in (*features_names(), *TARGETS):
        assert_identical(flat[name], expected[name], name)
        assert_identical(batch[name].numpy()[real], expected[name], name)
    last = (
        events.groupby("customer_id")["timestamp"]
        .apply(lambda t: t[t < pd.Timestamp("2024-04-01")].max())
        .dropna()
    )
    assert_identical(seq.last_event_time, last.to_numpy(), "last_event_time")


def test_event_features_are_the_untruncated_sequence_features():
    events = random_table(2)
    spec = FeaturiserSpec(
        SPEC.vocab,
        max_len=100,
        horizon_days=HORIZON,
        numeric_features=SPEC.numeric_features,
        categorical_features=SPEC.categorical_features,
        categorical_vocabs=SPEC.categorical_vocabs,
    )
    seq = build_sequences(events, spec, cutoff="2030-01-01")
    flat = spec.event_features(events)
    assert seq.n_events == len(events)
    kept = seq.at(np.arange(seq.n_events), features_names())
    for name in features_names():
        assert_identical(kept[name], flat[name], name)


def test_categorical_columns_give_the_same_sequences():
    """A compact table (customer and type as pandas categoricals, float32 amounts) builds the
    same sequences as the validated table of strings."""
    events = random_table(3)
    compact = events.astype(
        {
            "customer_id": "category",
            "event_type": "category",
            "channel": "category",
            "amount": np.float32,
        }
    )
    a, b = (build_sequences(t, SPEC, cutoff=CUTOFF) for t in (events, compact))
    assert SPEC.encode(compact).event_type.dtype == np.int8
    assert_identical(b.customer_ids, a.customer_ids, "customer_ids")
    for name in (*features_names(), *TARGETS):
        both = (a.features | a.targets)[name], (b.features | b.targets)[name]
        assert_identical(both[1], both[0], name)


def test_no_calibration_event_gives_no_customer():
    seq = build_sequences(random_table(), SPEC, cutoff="1960-01-01")
    assert len(seq) == 0 and seq.n_events == 0
    assert seq.features["numeric"].shape == (0, 1)
    assert seq.batch(np.arange(0))["next_type"].dtype == torch.int64


def test_ids_calendar_fields_and_churn_labels_are_kept_narrow():
    """One byte per event for each id, calendar field and churn label; batches widen them."""
    seq = build_sequences(random_table(), SPEC, cutoff=CUTOFF)
    narrow = ("event_type", "day_of_week", "day_of_month", "hour", "categorical")
    assert {seq.features[name].dtype for name in narrow} == {np.dtype(np.int8)}
    assert seq.targets["next_type"].dtype == np.int8 and seq.targets["churn_label"].dtype == bool
    batch = seq.batch(np.arange(4))
    assert {batch[name].dtype for name in (*narrow, "next_type")} == {torch.int64}
    assert batch["churn_label"].dtype == torch.float32


def test_unsorted_events_are_refused_naming_the_row():
    events = random_table().iloc[::-1].reset_index(drop=True)
    with pytest.raises(
        FintwinInputError, match=r"row \d+ is earlier than the row before it of the same customer"
    ):
        build_sequences(events, SPEC, cutoff=CUTOFF)
