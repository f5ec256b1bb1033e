"""events -> train -> export -> embedded Triton -> TwinClient (HTTP, gRPC) == onnxruntime."""

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.cli import main
from fintwin.models.checkpoint import load_twin
from fintwin.models.module import ExportableTwin
from fintwin.serving.client import TwinClient
from fintwin.serving.server import EmbeddedTriton


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.select_dtypes("number")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    repo = tmp_path_factory.mktemp("repo")
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo), "--name", "twin"]) == 0
    return repo


def test_in_process_scoring_matches_torch(exported, tiny_checkpoint, events_csv):
    client = TwinClient(repo=exported, model="twin")
    predictions = client.predict(events_csv)
    sequences = client.featurise(events_csv)
    client.close()
    wrapper = ExportableTwin(load_twin(tiny_checkpoint).model)
    batch = sequences.batch(np.arange(len(sequences)), with_targets=False)
    with torch.no_grad():
        churn = wrapper(*(batch[n] for n in wrapper.input_names))[5].numpy()
    assert len(predictions) == 60 and predictions["customer_id"].is_unique
    np.testing.assert_allclose(predictions["churn_prob"], churn, atol=1e-5)
    probs = predictions[["top1_prob", "top2_prob", "top3_prob"]].to_numpy()
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(axis=1) <= 1 + 1e-6).all()
    assert set(predictions["top1_type"]) <= {"card", "salary", "transfer", "<oov>"}


@pytest.mark.slow
def test_served_twin_equals_in_process(exported, events_csv):
    local = TwinClient(repo=exported, model="twin").predict(events_csv)
    with EmbeddedTriton(exported) as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            client = TwinClient(url, protocol, "twin", batch_size=16)
            served = client.predict(events_csv)
            client.close()
            assert served["customer_id"].tolist() == local["customer_id"].tolist()
            assert served["top1_type"].tolist() == local["top1_type"].tolist()
            np.testing.assert_allclose(_numeric(served), _numeric(local), atol=1e-5, rtol=0)
        process = server.process
    assert process.poll() is not None  # stopped, nothing left running


def test_predict_cli_writes_one_row_per_customer(exported, events_csv, tmp_path, capsys):
    out = tmp_path / "preds.parquet"
    assert main(["predict", "--repo", str(exported), "--model", "twin", "--events", events_csv,
                 "--out", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 60 and "60 customers scored" in capsys.readouterr().out


def test_predict_cli_bad_events_exit_2(exported, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("customer_id,timestamp,event_type,amount\n1,2024-01-01,card,-3\n")
    assert main(["predict", "--repo", str(exported), "--model", "twin", "--events", str(bad),
                 "--out", str(tmp_path / "p.parquet")]) == 2
    assert "negative value -3.0" in capsys.readouterr().err
    assert not (tmp_path / "p.parquet").exists()


def test_export_adds_a_version_and_keeps_the_first(exported, tiny_checkpoint):
    first = (exported / "twin" / "1" / "model.onnx").read_bytes()
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(exported), "--name", "twin"]) == 0
    assert (exported / "twin" / "2" / "model.onnx").is_file()
    assert (exported / "twin" / "1" / "model.onnx").read_bytes() == first


def test_export_missing_checkpoint_exit_2(tmp_path, capsys):
    assert main(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--repo", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
