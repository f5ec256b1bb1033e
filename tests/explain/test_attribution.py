"""Integrated-gradients attributions: completeness (their sum is prediction - reference within
1e-3 relative), the model's own outputs, nothing at padding, rows independent of the batch,
and the outputs that can and cannot be explained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fintwin.errors import FintwinInputError
from fintwin.explain.attribution import TOP_TYPE, Attributor, parse_output
from tests.explain.conftest import random_twin

OUTPUTS = ("churn_prob", "horizon_spend", "horizon_count", "next_event_probs", "dormant_prob",
           "next_time_mean")


def model_batch(spec, events):
    sequences = spec.inference_sequences(spec.read_events(events))
    batch = sequences.batch(np.arange(len(sequences)), with_targets=False)
    batch["days_since_last_event"] = torch.from_numpy(
        sequences.days_since_last_event().astype(np.float32))
    return sequences, batch


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_attributions_add_up_to_prediction_minus_reference(encoder, output, rich_events):
    model, spec = random_twin(encoder)
    sequences, batch = model_batch(spec, rich_events)
    selector = parse_output(output, spec)
    result = Attributor(model, spec.numeric_features, spec.categorical_features).attribute(
        batch, selector)
    assert result.fields == ["type", "amount", "gap", "calendar", "numeric:balance",
                             "categorical:channel"]
    with torch.no_grad():
        served = model.predict_last(batch)[output]
    want = served if served.dim() == 1 else served.gather(1, torch.from_numpy(result.index)[:, None])[:, 0]
    np.testing.assert_allclose(result.prediction, want.numpy(), rtol=1e-6, atol=1e-7)
    gap = result.prediction - result.reference
    assert np.all(np.abs(gap) > 0)
    np.testing.assert_allclose(result.total(), gap, rtol=1e-3, atol=0)
    assert result.converged().all() and np.all(result.steps >= 8)
    padded = ~(np.arange(batch["event_type"].shape[1])[None, :] < sequences.lengths[:, None])
    assert padded.any() and not result.events[padded].any()
    if output not in ("horizon_spend", "horizon_count"):  # only the horizon reads the silence
        assert not result.silence.any()
    else:
        assert np.abs(result.silence).max() > 0


def test_a_customer_gets_the_same_attributions_alone_as_in_a_batch(rich_events):
    model, spec = random_twin("lstm")
    _, batch = model_batch(spec, rich_events)
    attributor = Attributor(model, spec.numeric_features, spec.categorical_features)
    selector = parse_output("churn_prob", spec)
    together = attributor.attribute(batch, selector)
    alone_batch = {key: value[2:3] for key, value in batch.items()}
    width = int(alone_batch["length"][0])
    alone_batch = {key: value[:, :width] if value.dim() > 1 else value
                   for key, value in alone_batch.items()}
    alone = attributor.attribute(alone_batch, selector)
    np.testing.assert_allclose(alone.events[0], together.events[2, :width], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(alone.recency[0], together.recency[2], rtol=1e-4, atol=1e-7)


def test_the_steps_are_raised_until_complete(rich_events):
    """Starting from 2 steps, customers over the tolerance are integrated again with more."""
    model, spec = random_twin("transformer")
    _, batch = model_batch(spec, rich_events)
    result = Attributor(model, start_steps=2, numeric=spec.numeric_features,
                        categorical=spec.categorical_features).attribute(
        batch, parse_output("horizon_spend", spec))
    assert result.converged().all()
    assert result.steps.max() > 2 and set(result.steps) <= {2, 4, 8, 16, 32, 64, 128, 256, 512}


def test_output_names():
    _, spec = random_twin("lstm")
    assert parse_output("next_event_probs:salary", spec).index == spec.vocab.to_dict()["salary"]
    assert parse_output("next_event_probs", spec).index == TOP_TYPE
    with pytest.raises(FintwinInputError, match=r"unknown output 'churn'; expected one of .*churn_prob"):
        parse_output("churn", spec)
    with pytest.raises(FintwinInputError, match=r"unknown event type 'rent'; the model knows \['card'"):
        parse_output("next_event_probs:rent", spec)
    with pytest.raises(FintwinInputError, match="bisection.*explain next_time_mean instead"):
        parse_output("next_time_quantiles", spec)
    with pytest.raises(FintwinInputError, match="one number per customer; drop ':x'"):
        parse_output("churn_prob:x", spec)
