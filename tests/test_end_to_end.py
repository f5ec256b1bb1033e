"""events -> train -> export -> embedded Triton -> TwinClient (HTTP, gRPC) == onnxruntime."""

import numpy as np
import pandas as pd
import pytest
import torch

from fintwin.cli import main
from fintwin.data.contract import OUTPUT_NAMES
from fintwin.errors import FintwinInputError
from fintwin.export.graph import ExportableTwin
from fintwin.models.checkpoint import load_twin
from fintwin.serving.client import TwinClient
from fintwin.serving.server import EmbeddedTriton


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.select_dtypes("number")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    repo = tmp_path_factory.mktemp("repo")
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo), "--name", "twin"]) == 0
    return repo


def _torch_outputs(checkpoint, sequences) -> dict[str, np.ndarray]:
    """The checkpoint's serving outputs for ``sequences`` scored after their silence."""
    wrapper = ExportableTwin(load_twin(checkpoint).model)
    batch = sequences.batch(np.arange(len(sequences)), with_targets=False)
    batch["days_since_last_event"] = torch.from_numpy(
        sequences.days_since_last_event().astype(np.float32)
    )
    with torch.no_grad():
        outputs = wrapper(*(batch[n] for n in wrapper.input_names))
    return {name: value.numpy() for name, value in zip(OUTPUT_NAMES, outputs, strict=True)}


def test_in_process_scoring_matches_torch(exported, tiny_checkpoint, events_csv):
    client = TwinClient(repo=exported, model="twin")
    predictions = client.predict(events_csv)
    sequences = client.featurise(events_csv)
    client.close()
    expected = _torch_outputs(tiny_checkpoint, sequences)
    assert len(predictions) == 60 and predictions["customer_id"].is_unique
    for name in ("churn_prob", "horizon_count", "horizon_spend"):
        np.testing.assert_allclose(predictions[name], expected[name], rtol=1e-4, err_msg=name)
    probs = predictions[["top1_prob", "top2_prob", "top3_prob"]].to_numpy()
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(axis=1) <= 1 + 1e-6).all()
    assert set(predictions["top1_type"]) <= {"card", "salary", "transfer", "<oov>"}


def test_as_of_forecasts_the_horizon_after_each_customers_silence(
    exported, tiny_checkpoint, events_csv
):
    """Scoring 60 days after the last day feeds every customer 60 more days of silence: the
    horizon outputs move, the next-event outputs (right after the last event) do not."""
    last_day = pd.read_csv(events_csv, parse_dates=["timestamp"])["timestamp"].max().normalize()
    later = last_day + pd.Timedelta(days=60)
    client = TwinClient(repo=exported, model="twin")
    now, then = client.predict(events_csv), client.predict(events_csv, as_of=later)
    sequences = client.featurise(events_csv, as_of=later)
    np.testing.assert_allclose(
        sequences.days_since_last_event(), client.featurise(events_csv).days_since_last_event() + 60
    )
    expected = _torch_outputs(tiny_checkpoint, sequences)
    np.testing.assert_allclose(then["horizon_count"], expected["horizon_count"], rtol=1e-4)
    assert not np.allclose(then["horizon_count"], now["horizon_count"], rtol=1e-3)
    np.testing.assert_array_equal(then["churn_prob"], now["churn_prob"])
    with pytest.raises(FintwinInputError, match=r"customer \S+ has an event at .* after the as-of"):
        client.predict(events_csv, as_of=last_day - pd.Timedelta(days=1))
    client.close()


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
    assert main(["predict", "--repo", str(exported), "--model", "twin", "--events", events_csv,
                 "--out", str(out), "--as-of", "2000-01-01"]) == 2
    assert "after the as-of day 2000-01-01" in capsys.readouterr().err
    assert len(pd.read_parquet(out)) == 60  # the earlier output is left as it was


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
