"""A twin with categorical features: exported with them (ONNX parity), and served with the
contract's per-feature bounds."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.data.contract import CONTRACT_KEY, exported_contract, random_inputs
from fintwin.data.features import FEATURISER_KEY, OOV_ID, FeaturiserSpec, Vocab
from fintwin.export.graph import ExportableTwin
from fintwin.export.onnx import check_parity
from fintwin.export.triton_repo import write_model_version
from fintwin.serving.client import InProcessRunner, InvalidRequestError, TwinClient
from fintwin.serving.python_model import MetadataError, OnnxModel
from tests.models.conftest import TINY_ENCODERS, build_module

CATEGORICAL_SIZES = [4, 3]
SPEC = FeaturiserSpec(  # the featuriser of a twin with tests.models' sizes
    vocab=Vocab(("card", "cash", "loan", "salary", "transfer")), horizon_days=30.0, max_len=64,
    categorical_features=("channel", "country"),
    categorical_vocabs=(Vocab(("atm", "online")), Vocab(("nl",))),
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[ExportableTwin, Path]:
    """A tiny LSTM twin with two categorical features, exported to a repository (both
    encoders embed them in the same ``EventEmbedding``)."""
    twin = build_module(dict(TINY_ENCODERS["lstm"]), categorical_sizes=CATEGORICAL_SIZES)
    wrapper = ExportableTwin(twin)
    directory = tmp_path_factory.mktemp("categorical")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper.to_onnx(directory / "model.onnx")
    assert list(SPEC.categorical_sizes) == CATEGORICAL_SIZES
    metadata = {"max_len": 64, CONTRACT_KEY: exported_contract(wrapper.sizes),
                FEATURISER_KEY: SPEC.to_dict(), "quantiles": [0.1, 0.5, 0.9]}
    write_model_version(directory / "repo", "twin", directory / "model.onnx", metadata)
    return wrapper, directory


def test_categorical_is_a_graph_input_with_parity(exported):
    wrapper, directory = exported
    assert wrapper.input_names[-1] == "categorical"
    report = check_parity(wrapper, directory / "model.onnx", shapes=((1, 1), (4, 13), (9, 40)))
    assert report.worst < 1e-4


def test_served_model_reads_categorical_within_per_feature_bounds(exported):
    wrapper, directory = exported
    runner = InProcessRunner(directory / "repo", "twin")
    inputs = random_inputs(np.random.default_rng(3), wrapper.sizes, 3, 6, lengths=[6, 6, 6])
    inputs["categorical"][:] = [3, 2]  # the largest id of each feature
    served = runner.infer(inputs)
    with torch.no_grad():
        expected = wrapper(*(torch.from_numpy(inputs[name]) for name in wrapper.input_names))
    np.testing.assert_allclose(served["next_event_probs"], expected[0].numpy(), atol=1e-5)

    changed = {**inputs, "categorical": inputs["categorical"].copy()}
    changed["categorical"][:, -1, 1] = 1  # the last event's second feature: unknown value
    moved = runner.infer(changed)["next_event_probs"]
    assert np.abs(moved - served["next_event_probs"]).max() > 1e-4

    changed["categorical"][1, 2, 1] = 3  # one past the second feature's vocabulary
    with pytest.raises(InvalidRequestError, match=r"'categorical' holds 3 at row 1, position 2, 1; "
                       r"expected values in \[0, 3\) at index 1 of the last axis \(one bound per "
                       r"index: \[4, 3\]\)"):
        runner.infer(changed)
    runner.close()


def test_client_sends_the_fields_encoded_with_the_specs_vocabularies(exported):
    wrapper, directory = exported
    events = pd.DataFrame({
        "customer_id": ["a", "a", "b"],
        "timestamp": ["2024-01-01", "2024-01-03", "2024-01-02"],
        "event_type": ["card", "salary", "loan"],
        "amount": [10.0, 2000.0, 300.0],
        "channel": ["atm", "branch", "online"],  # branch: unknown to the vocabulary
        "country": ["nl", "nl", "de"],
    })
    client = TwinClient(repo=directory / "repo", model="twin")
    sent = []
    infer = client.transport.infer
    client.transport.infer = lambda inputs: sent.append(inputs) or infer(inputs)
    rows = client.predict(events)
    client.close()
    assert sent[0]["categorical"][:, :2].tolist() == [[[2, 2], [OOV_ID, 2]], [[3, OOV_ID], [0, 0]]]
    batch = {name: torch.from_numpy(sent[0][name]) for name in wrapper.input_names}
    with torch.no_grad():
        expected = wrapper.twin.predict_last(batch)["churn_prob"].numpy()
    np.testing.assert_allclose(rows["churn_prob"].to_numpy(), expected, atol=1e-5)


def test_contract_bounds_categorical_per_feature():
    sizes = {"vocab_size": 6, "quantiles": 3, "numeric_features": 0, "categorical_features": 2,
             "categorical_sizes": CATEGORICAL_SIZES}
    inputs = random_inputs(np.random.default_rng(1), sizes, batch=50, seq_len=7)
    real = np.arange(7)[None, :] < inputs["length"][:, None]
    values = inputs["categorical"]
    assert values.shape == (50, 7, 2) and values.dtype == np.int64
    assert (values[~real] == 0).all()
    for feature, size in enumerate(CATEGORICAL_SIZES):  # every id 1 .. size - 1 drawn
        assert set(np.unique(values[real][:, feature])) == set(range(1, size))
    entry = exported_contract(sizes)["inputs"][-1]
    assert entry == {"name": "categorical", "dtype": "int64", "shape": ["batch", "seq", 2],
                     "low": 0, "high": [4, 3], "closed": "left", "finite": False}
    plain = {"vocab_size": 6, "numeric_features": 0}
    assert "categorical" not in random_inputs(np.random.default_rng(1), plain, 2, 3)
    with pytest.raises(ValueError, match="'categorical_sizes' has 1 values; expected one per"):
        exported_contract({**sizes, "categorical_sizes": [4]})


def test_served_model_refuses_a_contract_without_a_bound_per_feature(exported):
    wrapper, directory = exported
    contract = exported_contract(wrapper.sizes)
    contract["inputs"][-1]["high"] = [4]
    with pytest.raises(MetadataError, match=r"one bound per element of their last axis: "
                       r"\{'categorical': \[4\]\}"):
        OnnxModel(directory / "model.onnx", {CONTRACT_KEY: contract})
