import numpy as np
import pandas as pd
import torch

from fintwin.data.datamodule import CustomerSplit, EventDataModule
from fintwin.data.features import OOV_ID, FeaturiserSpec, Vocab
from fintwin.data.schema import validate_events
from fintwin.data.sequences import loss_terms_per_customer, training_extent
from fintwin.models.module import silent_window_targets

CUTOFF = "2024-05-31"  # calibration ends at 2024-06-01 00:00


def hand_table():
    """Customer a: events on days 0, 10, 40 (+ one after the cut-off); b: a single event."""
    t0 = pd.Timestamp("2024-05-01")
    rows = [("a", t0, "card", 10.0), ("a", t0 + pd.Timedelta(days=10), "salary", 100.0),
            ("a", t0 + pd.Timedelta(days=20, hours=12), "card", 5.0),
            ("a", pd.Timestamp("2024-06-15"), "card", 7.0),
            ("b", pd.Timestamp("2024-05-30"), "mystery", 3.0)]
    df = pd.DataFrame(rows, columns=["customer_id", "timestamp", "event_type", "amount"])
    return validate_events(df)[0]


def hand_sequences(max_len=10, types=("card", "salary"), horizon_days=15):
    spec = FeaturiserSpec(Vocab(types), max_len=max_len, horizon_days=horizon_days)
    return spec.sequences(hand_table(), CUTOFF)


def test_targets_by_hand():
    seq = hand_sequences()
    b = seq.batch(np.array([0, 1]))
    assert b["length"].tolist() == [3, 1]
    assert b["event_type"].tolist() == [[2, 3, 2], [OOV_ID, 0, 0]]
    assert torch.allclose(b["delta_t"][0], torch.tensor([0.0, 10.0, 10.5]))
    # gap after the last calibration event is censored at 2024-06-01: 10.5 days for a, 2 for b
    assert torch.allclose(b["next_gap"], torch.tensor([[10.0, 10.5, 10.5], [2.0, 0, 0]]))
    assert b["gap_censored"].tolist() == [[False, False, True], [True, False, False]]
    assert b["next_type"].tolist() == [[3, 2, 0], [0, 0, 0]]
    # whole 15-day windows after a's first two events fit before 2024-06-01
    assert b["horizon_mask"].tolist() == [[True, True, False], [False, False, False]]
    # churn within 15 days: gap 10 -> 0, gap 10.5 -> 0; censored 10.5 < 15 -> unknown
    assert b["churn_label"][0, :2].tolist() == [0.0, 0.0]
    assert b["churn_mask"].tolist() == [[True, True, False], [False, False, False]]


def test_loss_terms_per_customer_by_hand():
    seq = hand_sequences()
    # a: 2 observed next events, 3 gaps (one censored), 2 churn and 2 horizon targets; b: 1 gap
    assert loss_terms_per_customer(seq, np.array([0])) == {
        "events_per_customer": 2.0,
        "time_terms_per_customer": 3.0,
        "churn_terms_per_customer": 2.0,
        "horizon_terms_per_customer": 2.0,
    }
    assert loss_terms_per_customer(seq, np.array([0, 1])) == {
        "events_per_customer": 1.0,
        "time_terms_per_customer": 2.0,
        "churn_terms_per_customer": 1.0,
        "horizon_terms_per_customer": 1.0,
    }


def test_truncation_keeps_most_recent_and_padding_is_zero():
    seq = hand_sequences(max_len=2)
    b = seq.batch(np.array([1, 0]))
    assert b["length"].tolist() == [1, 2]
    assert b["amount"].tolist() == [[3.0, 0.0], [100.0, 5.0]]
    assert b["delta_t"][1].tolist() == [10.0, 10.5]  # the real gap to the dropped first event
    assert b["day_of_month"][0, 1] == 0 and not b["gap_censored"][0, 1]


def test_horizon_targets_after_a_silence_by_hand():
    """a: events on days 0, 10, 20.5, observation ends on day 31, horizon 15 days."""
    seq = hand_sequences()
    b = seq.batch(np.array([0, 1]))
    # right after each event; the post-cutoff event of 2024-06-15 is invisible
    right_after = silent_window_targets(b, 15.0, 0.0)
    assert right_after["count"].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert right_after["spend"].tolist() == [[100.0, 5.0, 0.0], [0.0, 0.0, 0.0]]
    assert right_after["elapsed"].tolist() == [[0.0] * 3] * 2
    assert right_after["mask"].tolist() == b["horizon_mask"].tolist()
    # half-way through the room: min(next gap 10, 31 - 0 - 15) / 2 = 5 -> window (5, 20];
    # min(10.5, 31 - 10 - 15) / 2 = 3 -> window (13, 28]
    halfway = silent_window_targets(b, 15.0, 0.5)
    assert halfway["elapsed"][0].tolist() == [5.0, 3.0, 0.0]
    assert halfway["count"][0].tolist() == [1.0, 1.0, 0.0]
    assert halfway["spend"][0].tolist() == [100.0, 5.0, 0.0]
    # most of the room: silent 9.9 days -> window (9.9, 24.9] holds day 10 and day 20.5
    late = silent_window_targets(b, 15.0, torch.tensor([[0.99, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert late["count"][0].tolist() == [2.0, 1.0, 0.0]
    assert late["spend"][0].tolist() == [105.0, 5.0, 0.0]
    # truncation keeps the later events, so the targets do not change
    short = hand_sequences(max_len=2).batch(np.array([0]))
    assert silent_window_targets(short, 15.0, 0.5)["count"][0].tolist() == [1.0, 0.0]


def test_training_extent_counts_the_kept_events_their_gaps_and_the_longest_silence():
    """a keeps 3 events over 20.5 days; truncated to 2, its kept gaps still sum to 20.5. A
    whole 15-day window follows at most 10 days of silence (after day 0, before day 10)."""
    full = hand_sequences()
    assert training_extent(full, np.array([0, 1]), 15.0) == {
        "history_max_events": 3.0,
        "history_max_days": 20.5,
        "horizon_max_elapsed": 10.0,
    }
    assert training_extent(full, np.array([1]), 15.0) == {
        "history_max_events": 1.0,
        "history_max_days": 0.0,
    }
    assert training_extent(full, np.array([], dtype=np.int64), 15.0) == {}
    short = hand_sequences(max_len=2)
    assert training_extent(short, np.array([0]), 15.0) == {
        "history_max_events": 2.0,
        "history_max_days": 20.5,
        "horizon_max_elapsed": 6.0,
    }


def test_single_event_customer_kept():
    seq = hand_sequences(max_len=5, types=("card",), horizon_days=1)
    assert list(seq.customer_ids) == ["a", "b"] and seq.lengths.tolist() == [3, 1]


def _datamodule(events):
    dm = EventDataModule(events=events, cutoff="2024-05-31", horizon_days=30, max_len=16,
                         batch_size=8, split=CustomerSplit(val=0.2, test=0.2, seed=3), seed=3)
    dm.setup()
    return dm


def _all_batches(dm):
    return {k: dm.sequences.batch(np.arange(len(dm.sequences)))[k] for k in dm.sequences.features} | {
        k: dm.sequences.batch(np.arange(len(dm.sequences)))[k] for k in dm.sequences.targets}


def test_no_leak_from_after_cutoff(events):
    base = _datamodule(events)
    after = events["timestamp"] >= pd.Timestamp("2024-06-01")
    assert after.sum() > 10
    moved = events.copy()
    moved.loc[after, "timestamp"] += pd.Timedelta(days=3)
    moved.loc[after, "amount"] *= 100
    deleted = events[~after]
    for variant in (moved, deleted):
        other = _datamodule(variant)
        assert other.spec == base.spec and other.model_scaling == base.model_scaling
        for split in ("train", "val", "test"):
            assert np.array_equal(other.splits[split], base.splits[split])
        for name, tensor in _all_batches(base).items():
            assert torch.equal(_all_batches(other)[name], tensor), name


def test_split_is_disjoint_seeded_and_complete(events):
    dm = _datamodule(events)
    parts = [set(dm.splits[s].tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(dm.sequences) and not (parts[0] & parts[1] | parts[1] & parts[2])
    assert np.array_equal(_datamodule(events).splits["val"], dm.splits["val"])


def test_bucketed_loader_covers_train_once_with_less_padding(events):
    dm = _datamodule(events)
    dm.bucket_by_length = True
    seen, padded, real = [], 0, 0
    for batch in dm.train_dataloader():
        seen.append(batch["length"])
        padded += batch["event_type"].numel()
        real += int(batch["length"].sum())
    lengths = torch.cat(seen)
    assert len(lengths) == len(dm.splits["train"])
    assert sorted(lengths.tolist()) == sorted(dm.sequences.lengths[dm.splits["train"]].tolist())
    dm.bucket_by_length = False
    unbucketed = sum(b["event_type"].numel() for b in dm.train_dataloader())
    assert padded <= unbucketed and real > 0
