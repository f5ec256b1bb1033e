"""The served model checks requests against the contract in fintwin.json, and refuses to load
without one or with one that is not its graph's."""

from __future__ import annotations

import copy

import pytest

from fintwin.export.triton_repo import ModelRepositoryError, write_model_version
from fintwin.serving.client import InProcessRunner
from fintwin.serving.python_model import CONTRACT_KEY, InputError, MetadataError, OnnxModel


def _with_input_entry(metadata: dict, name: str, **changes) -> dict:
    changed = copy.deepcopy(metadata)
    for entry in changed[CONTRACT_KEY]["inputs"]:
        if entry["name"] == name:
            entry.update(changes)
    return changed


def test_bounds_are_read_from_the_metadata(standin_onnx, standin, rng):
    model = OnnxModel(standin_onnx, _with_input_entry(standin.metadata, "hour", high=12))
    inputs = standin.random_inputs(rng, batch=2, seq=4, lengths=[4, 4])
    inputs["hour"][:] = 11
    model.run(inputs)
    inputs["hour"][1, 2] = 12

    with pytest.raises(InputError, match=r"'hour' holds 12 at row 1, position 2; .*\[0, 12\)"):
        model.run(inputs)


def test_model_without_contract_is_refused_naming_the_file(standin_onnx, standin):
    metadata = {k: v for k, v in standin.metadata.items() if k != CONTRACT_KEY}

    with pytest.raises(MetadataError) as error:
        OnnxModel(standin_onnx, metadata)

    message = str(error.value)
    assert str(standin_onnx.with_name("fintwin.json")) in message
    assert "no 'contract'" in message and "fintwin export" in message


def test_contract_of_another_graph_is_refused(standin_onnx, standin):
    wider = copy.deepcopy(standin.metadata)
    wider[CONTRACT_KEY]["outputs"][0]["shape"] = ["batch", standin.vocab_size + 1]

    with pytest.raises(MetadataError, match=r"declares outputs .*next_event_probs FP32 \[batch, 13\]"
                       r".* has .*next_event_probs FP32 \[batch, 12\]"):
        OnnxModel(standin_onnx, wider)


def test_in_process_runner_names_a_repository_without_contract(standin_onnx, standin, tmp_path):
    metadata = {k: v for k, v in standin.metadata.items() if k != CONTRACT_KEY}
    write_model_version(tmp_path, standin.model_name, standin_onnx, metadata)

    with pytest.raises(ModelRepositoryError, match=r"twin/1/fintwin.json has no 'contract'"):
        InProcessRunner(tmp_path, standin.model_name)


def test_bound_by_an_axis_the_graph_lacks_is_refused(standin_onnx, standin):
    metadata = _with_input_entry(standin.metadata, "length", high="events")

    with pytest.raises(MetadataError, match=r"axes the graph does not have: \{'length': 'events'\}"):
        OnnxModel(standin_onnx, metadata)
