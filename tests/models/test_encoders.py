"""Encoders: causality, padding invariance, stepping from a carried state."""

from __future__ import annotations

import math

import pytest
import torch

from fintwin.data.contract import sequence_inputs
from fintwin.models.encoders import (
    RECENCY_CAP_DAYS,
    HistorySummary,
    TypeRecency,
    build_encoder,
    causal_running_max,
    doubling_running_max,
    gather_last,
)

N_NUMERIC = 2
CATEGORICAL_SIZES = (4, 3)  # two categorical features: ids 2.. known, 1 unknown, 0 padding
SIZES = {"numeric_features": N_NUMERIC, "categorical_features": len(CATEGORICAL_SIZES),
         "categorical_sizes": list(CATEGORICAL_SIZES)}  # fmt: skip
SEQUENCE_KEYS = tuple(spec.name for spec in sequence_inputs(SIZES))
FEATURES = {"n_numeric": N_NUMERIC, "categorical_sizes": CATEGORICAL_SIZES}


@pytest.fixture
def encoder(make_module, encoder_config):
    """A tiny encoder of each kind (parametrised), with two numeric and two categorical
    features."""
    return make_module(encoder_config, **FEATURES).encoder


def _scramble_after(batch: dict, position: int, seed: int) -> dict:
    """A copy of ``batch`` with every input after ``position`` replaced by other values."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        value = batch[key].clone()
        tail = value[:, position + 1 :]
        if value.dtype == torch.int64:
            high = {"day_of_week": 6, "categorical": min(CATEGORICAL_SIZES) - 1}.get(key, 5)
            tail.copy_(torch.randint(0, high, tail.shape, generator=generator) + 1)
        else:
            tail.copy_(torch.rand(tail.shape, generator=generator) * 50.0)
        out[key] = value
    return out


@torch.no_grad()
def test_outputs_are_causal(encoder, make_batch):
    batch = make_batch([8, 8, 8], **FEATURES, seed=1)
    hidden = encoder(batch)
    for position in (0, 3, 6):
        changed = encoder(_scramble_after(batch, position, seed=position))
        torch.testing.assert_close(
            changed[:, : position + 1], hidden[:, : position + 1], atol=1e-6, rtol=0
        )
        assert not torch.allclose(changed[:, position + 1 :], hidden[:, position + 1 :])


@torch.no_grad()
def test_padding_does_not_change_real_positions(encoder, make_batch):
    lengths = [5, 2, 7]
    short = make_batch(lengths, max_len=7, **FEATURES, seed=2)
    long = make_batch(lengths, max_len=12, **FEATURES, seed=2)
    for b, n in enumerate(lengths):  # junk in the padding of the longer batch
        for key in SEQUENCE_KEYS:
            long[key][b, n:] = 2 if key == "categorical" else 3
    hidden_short, hidden_long = encoder(short), encoder(long)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(hidden_long[b, :n], hidden_short[b, :n], atol=1e-6, rtol=0)


def _event_at(batch: dict, position: torch.Tensor) -> dict:
    """Per-row event at ``position`` (``[B]``) as a dict of ``[B]`` tensors (``[B, F]``)."""
    rows = torch.arange(position.shape[0])
    return {key: batch[key][rows, position] for key in SEQUENCE_KEYS}


@torch.no_grad()
def test_prefix_state_then_steps_match_full_pass(encoder, make_batch):
    batch = make_batch([7, 3, 5, 1, 6], **FEATURES, seed=3)
    full = encoder(batch)
    full_length = batch["length"]
    prefix_length = torch.tensor([4, 1, 2, 1, 6])
    # The prefix batch still holds the later events beyond each row's (shorter) length.
    state = encoder.prefix_state({**batch, "length": prefix_length})
    torch.testing.assert_close(state["hidden"], gather_last(full, prefix_length), atol=1e-5, rtol=0)
    compared = 0
    for step in range(int((full_length - prefix_length).max())):
        position = prefix_length + step
        hidden, state = encoder.step(_event_at(batch, position.clamp(max=6)), state)
        real = position < full_length
        expected = full[torch.arange(5), position.clamp(max=6)]
        torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=0)
        compared += int(real.sum())
    assert compared == int((full_length - prefix_length).sum()) == 8


@torch.no_grad()
def test_expand_state_repeats_each_customer(encoder, make_batch):
    batch = make_batch([4, 2], **FEATURES, seed=4)
    state = encoder.prefix_state(batch)
    expanded = encoder.expand_state(state, 3)
    event = _event_at(batch, torch.tensor([1, 1]))
    hidden, _ = encoder.step(event, state)
    hidden_expanded, new_state = encoder.step(
        {key: value.repeat_interleave(3, dim=0) for key, value in event.items()}, expanded
    )
    assert all(value.shape[0] == 6 for value in new_state.values())
    torch.testing.assert_close(hidden_expanded, hidden.repeat_interleave(3, dim=0))


@torch.no_grad()
def test_raw_amounts_are_standardised_with_stored_statistics(make_module, make_batch):
    """The model takes raw values and standardises them with the stored statistics."""
    encoder = make_module({"name": "lstm", "hidden_size": 8}, n_numeric=N_NUMERIC).encoder
    batch = make_batch([3], n_numeric=N_NUMERIC, seed=5)
    values = encoder.embedding.scaled_values(batch)[0, :3]
    amount = batch["amount"][0, :3]
    torch.testing.assert_close(values[:, 0], (torch.log1p(amount) - 3.0) / 1.2)
    torch.testing.assert_close(values[:, 2], (batch["numeric"][0, :3, 0] - 0.5) / 2.0)


@torch.no_grad()
def test_a_categorical_value_changes_the_output_from_its_event_on(encoder, make_batch):
    """Only one event's value of the second categorical feature changes: the hidden states
    before it stay, those at and after it move; the full pass and stepping agree."""
    batch = make_batch([6, 6], **FEATURES, seed=6)
    batch["categorical"][:, :, 1] = 2
    changed = {**batch, "categorical": batch["categorical"].clone()}
    changed["categorical"][:, 3, 1] = 1  # a known value -> the unknown one, at event 3
    hidden, moved = encoder(batch), encoder(changed)
    torch.testing.assert_close(moved[:, :3], hidden[:, :3], atol=1e-6, rtol=0)
    assert (moved[:, 3:] - hidden[:, 3:]).abs().amax(dim=-1).min() > 1e-3
    state = encoder.prefix_state({**changed, "length": torch.tensor([3, 3])})
    stepped, _ = encoder.step(_event_at(changed, torch.tensor([3, 3])), state)
    torch.testing.assert_close(stepped, moved[:, 3], atol=1e-5, rtol=0)


def test_categorical_embeddings_follow_the_sizes(make_module):
    module = make_module({"name": "lstm", "hidden_size": 8}, categorical_sizes=[5, 2])
    embeddings = module.encoder.embedding.categorical_embeddings
    assert [(e.num_embeddings, e.padding_idx) for e in embeddings] == [(5, 0), (2, 0)]
    assert module.contract_sizes()["categorical_sizes"] == [5, 2]
    plain = make_module({"name": "lstm", "hidden_size": 8})
    assert not any("categorical" in key for key in plain.state_dict())
    assert plain.contract_sizes()["categorical_features"] == 0
    with pytest.raises(ValueError, match=r"categorical_sizes \[5, 1\].*>= 2"):
        make_module({"name": "lstm", "hidden_size": 8}, categorical_sizes=[5, 1])


def test_missing_scaling_statistics_are_named():
    with pytest.raises(KeyError, match="delta_t_std"):
        build_encoder("lstm", 5, {"amount_mean": 0, "amount_std": 1, "delta_t_mean": 0})
    scaling = {"amount_mean": 0, "amount_std": 1, "delta_t_mean": 0, "delta_t_std": 1}
    with pytest.raises(ValueError, match="numeric_mean"):
        build_encoder("lstm", 5, scaling, n_numeric=2)
    with pytest.raises(ValueError, match="unknown encoder 'gru'"):
        build_encoder("gru", 5, scaling)


def test_type_recency_by_hand():
    """Days since the last event of each type; the cap before a type's first event."""
    recency = TypeRecency(vocab_size=4, dim=2)
    batch = {
        "event_type": torch.tensor([[2, 3, 2, 2, 0]]),  # the last position is padding
        "delta_t": torch.tensor([[5.0, 1.0, 2.5, 4.0, 0.0]]),
    }
    since = recency.running(batch)[0]
    cap = RECENCY_CAP_DAYS
    assert since[:4, 2].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert since[:4, 3].tolist() == [cap, 0.0, 2.5, 6.5]
    assert since[:4, 1].tolist() == [cap] * 4  # OOV never seen


def test_history_summary_by_hand():
    """Running count, gaps, days, rate and mean log gap / amount; the first event has no gap."""
    scaling = {"amount_mean": 1.0, "amount_std": 2.0, "delta_t_mean": 0.5, "delta_t_std": 0.25}
    summary = HistorySummary(dim=3, scaling=scaling)
    batch = {
        "delta_t": torch.tensor([[0.0, 3.0, 12.0, 0.0]]),  # the last position is padding
        "amount": torch.tensor([[10.0, 0.0, 4.0, 0.0]]),
    }
    sums = summary.running(batch)[0, :3]
    assert sums[:, 0].tolist() == [1.0, 2.0, 3.0]  # events
    assert sums[:, 1].tolist() == [0.0, 1.0, 2.0]  # gaps
    assert sums[:, 2].tolist() == [0.0, 3.0, 15.0]  # days since the first event
    with torch.no_grad():
        summary.projection.weight.copy_(torch.eye(5)[:3])  # read out events, days, rate
        summary.projection.bias.zero_()
        features = summary(batch)[0, 2]
    expected = [math.log1p(3.0), math.log1p(15.0), math.log1p(30.0 * 2 / 15.0)]
    torch.testing.assert_close(features, torch.tensor(expected))
    mean_log_gap = (math.log1p(3.0) + math.log1p(12.0)) / 2
    mean_log_amount = (math.log1p(10.0) + math.log1p(4.0)) / 3
    with torch.no_grad():
        summary.projection.weight.copy_(torch.eye(5)[[3, 4, 0]])
        features = summary(batch)[0, 2]
    torch.testing.assert_close(
        features[:2], torch.tensor([(mean_log_gap - 0.5) / 0.25, (mean_log_amount - 1.0) / 2.0])
    )


def test_history_summary_clamps_count_and_age_to_the_training_range():
    """Beyond the longest training history the count and age stop growing; the rate and
    the means still use every event."""
    scaling = {"amount_mean": 1.0, "amount_std": 2.0, "delta_t_mean": 0.5, "delta_t_std": 0.25,
               "history_max_events": 2.0, "history_max_days": 5.0}  # fmt: skip
    summary = HistorySummary(dim=3, scaling=scaling)
    batch = {"delta_t": torch.tensor([[0.0, 3.0, 12.0]]), "amount": torch.tensor([[1.0, 2.0, 3.0]])}
    with torch.no_grad():
        summary.projection.weight.copy_(torch.eye(5)[:3])  # read out events, days, rate
        summary.projection.bias.zero_()
        features = summary(batch)[0]
    expected_last = [math.log1p(2.0), math.log1p(5.0), math.log1p(30.0 * 2 / 15.0)]
    torch.testing.assert_close(features[2], torch.tensor(expected_last))
    torch.testing.assert_close(features[1], torch.tensor([math.log1p(2.0), math.log1p(3.0),
                                                          math.log1p(10.0)]))  # fmt: skip
    assert "max_extent" not in summary.state_dict()  # rebuilt from the scaling


@pytest.mark.parametrize(
    "module",
    [
        TypeRecency(vocab_size=7, dim=3),
        HistorySummary(
            dim=3,
            scaling={
                "amount_mean": 3.0,
                "amount_std": 1.2,
                "delta_t_mean": 2.0,
                "delta_t_std": 1.0,
            },
        ),
    ],
    ids=["type_recency", "history_summary"],
)
def test_running_features_step_like_the_full_pass(module, make_batch):
    batch = make_batch([9, 6], seed=4)
    full = module.running(batch)
    prefix = {key: value[:, :4] for key, value in batch.items() if key != "length"}
    state = module.running(prefix)[:, -1]
    for t in range(4, 6):
        event = {key: value[:, t] for key, value in batch.items() if key != "length"}
        features, state = module.step(event, state)
        torch.testing.assert_close(state, full[:, t])
        torch.testing.assert_close(features[:, 0], module.features(full[:, t]))


@pytest.mark.parametrize("length", [1, 5, 300])
def test_exported_running_max_equals_cummax(length):
    """The export path (shift-and-max doublings) and the eager one (cummax) agree exactly."""
    values = torch.randn(3, length, 4, dtype=torch.float64)
    values[values < -0.5] = -math.inf  # "no event of this type yet"
    expected = torch.cummax(values, dim=1).values
    assert torch.equal(doubling_running_max(values), expected)
    assert torch.equal(causal_running_max(values), expected)
