"""One featuriser spec from training to serving: a twin trained on refunds (negative amounts)
with a numeric field keeps its FeaturiserSpec in the checkpoint, the export copies it
unchanged, and the exported twin reads its own training file. Checkpoints from before the spec
load through its converter; exports from before it are refused with how to export again."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.cli import main
from fintwin.data.features import FEATURISER_KEY, LEGACY_KEYS, stored_spec
from fintwin.errors import FintwinInputError
from fintwin.export.onnx import ParityReport, export_metadata
from fintwin.export.triton_repo import FEATURISER_PARAMETER, read_model_config
from fintwin.models.checkpoint import DATA_STATE_KEY, SPLIT_KEYS, load_twin
from fintwin.training import run
from tests.conftest import make_events
from tests.test_train import compose_cfg, tiny_overrides

REFUNDS = ["data.schema.numeric_features=[balance]", "data.schema.allow_negative_amount=true"]


@pytest.fixture(scope="module")
def refunds_csv(tmp_path_factory) -> str:
    """Sixty customers whose every seventh event is a refund, with a balance column."""
    events = make_events(n_customers=60, seed=1)
    events["balance"] = np.random.default_rng(3).normal(100, 30, len(events)).round(2)
    events.loc[events.index % 7 == 0, "amount"] *= -1
    path = tmp_path_factory.mktemp("refunds") / "refunds.csv"
    events.to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def refunds_checkpoint(tmp_path_factory, refunds_csv) -> Path:
    out = tmp_path_factory.mktemp("refunds_run")
    run(compose_cfg(out, tiny_overrides(refunds_csv, "lstm") + REFUNDS + ["test=false"]))
    return out / "checkpoints" / "last.ckpt"


def _export(ckpt: Path, repo: Path) -> Path:
    assert main(["export", "--ckpt", str(ckpt), "--repo", str(repo), "--name", "twin"]) == 0
    return repo


@pytest.fixture(scope="module")
def refunds_repo(tmp_path_factory, refunds_checkpoint) -> Path:
    return _export(refunds_checkpoint, tmp_path_factory.mktemp("refunds_repo"))


def _predict(repo: Path, events: str, out: Path) -> int:
    return main(["predict", "--repo", str(repo), "--model", "twin", "--events", events,
                 "--out", str(out)])  # fmt: skip


def test_a_twin_trained_on_refunds_scores_its_own_training_file(
    refunds_repo, refunds_csv, tmp_path
):
    out = tmp_path / "predictions.csv"
    assert _predict(refunds_repo, refunds_csv, out) == 0
    predictions = pd.read_csv(out)
    customers = pd.read_csv(refunds_csv)["customer_id"].unique()
    assert sorted(predictions["customer_id"]) == sorted(customers)
    assert predictions["churn_prob"].between(0, 1).all()


def test_the_exported_metadata_round_trips_to_the_checkpoints_spec(
    refunds_repo, refunds_checkpoint
):
    spec = load_twin(refunds_checkpoint).spec
    assert spec.allow_negative_amount and spec.numeric_features == ("balance",)
    assert len(spec.scaling.numeric_mean) == 1 and spec.max_len == 200
    model_dir = refunds_repo / "twin"
    version = json.loads((model_dir / "1" / "fintwin.json").read_text())
    parameter = read_model_config(model_dir).parameters[FEATURISER_PARAMETER].string_value
    assert version[FEATURISER_KEY] == spec.to_dict()  # copied unchanged
    for document in (version, json.loads((model_dir / "fintwin.json").read_text()),
                     json.loads(parameter)):  # fmt: skip
        assert stored_spec(document, "exported") == spec


def test_a_twin_trained_without_refunds_refuses_them_naming_the_config_key(
    tiny_checkpoint, tmp_path
):
    events = make_events(n_customers=2).assign(amount=lambda t: -t["amount"])
    with pytest.raises(FintwinInputError) as error:
        load_twin(tiny_checkpoint).spec.read_events(events)
    assert "(set data.schema.allow_negative_amount to accept negative amounts)" in str(error.value)
    cfg = compose_cfg(tmp_path, tiny_overrides("events.csv", "lstm"))
    assert cfg.data.schema.allow_negative_amount is False  # the key the message names


def _legacy_checkpoint(ckpt: Path, path: Path) -> Path:
    """``ckpt`` rewritten as checkpoints were before FeaturiserSpec: one flat dict of data
    settings holding the model's scaling."""
    checkpoint = torch.load(ckpt, weights_only=True)
    state = checkpoint[DATA_STATE_KEY]
    checkpoint[DATA_STATE_KEY] = {
        **{key: state[key] for key in SPLIT_KEYS},
        **{key: state[FEATURISER_KEY][key] for key in LEGACY_KEYS},
        "categorical_features": [],
        "scaling": checkpoint["hyper_parameters"]["scaling"],
    }
    torch.save(checkpoint, path)
    return path


def test_an_old_format_checkpoint_loads_through_the_converter(refunds_checkpoint, tmp_path):
    old = _legacy_checkpoint(refunds_checkpoint, tmp_path / "old.ckpt")
    twin, converted = load_twin(refunds_checkpoint), load_twin(old)
    assert converted.spec == twin.spec and converted.split == twin.split
    metadata = export_metadata(converted, old, ParityReport())
    assert metadata[FEATURISER_KEY] == twin.spec.to_dict()


def test_an_old_format_export_is_refused_with_how_to_export_again(
    refunds_repo, refunds_csv, tmp_path, capsys
):
    repo = tmp_path / "repo"
    shutil.copytree(refunds_repo, repo)
    path = repo / "twin" / "1" / "fintwin.json"
    metadata = json.loads(path.read_text())
    spec = metadata.pop(FEATURISER_KEY)
    old_keys = ("vocab", "numeric_features", "horizon_days", "max_len", "same_day_merge", "scaling")
    path.write_text(json.dumps(metadata | {key: spec[key] for key in old_keys}))
    out = tmp_path / "predictions.csv"

    assert _predict(repo, refunds_csv, out) == 2

    err = capsys.readouterr().err
    assert err == (
        "fintwin: error: model 'twin': featuriser settings written before fintwin's "
        "FeaturiserSpec lack ['allow_negative_amount', 'drop_duplicates'], so events cannot be "
        "read as in training; export the model again from its checkpoint (fintwin export "
        "--ckpt CKPT --repo DIR), or train it again\n"
    )
    assert not out.exists()
