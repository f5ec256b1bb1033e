"""`fintwin explain`: tables, JSON and HTML from a repository's explanation model or a
checkpoint; bad customer ids, output names and files exit 2 naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fintwin.cli import main
from tests.explain.conftest import MODEL


@pytest.fixture
def events_file(tmp_path, rich_events) -> str:
    path = tmp_path / "events.csv"
    rich_events.to_csv(path, index=False)
    return str(path)


def explain(*args: str) -> int:
    return main(["explain", *args])


def test_parquet_tables_and_html_pages(explain_repo, events_file, tmp_path):
    out = tmp_path / "reasons.parquet"
    assert explain("--repo", str(explain_repo), "--model", MODEL, "--events", events_file,
                   "--customers", "c001", "long", "--output", "horizon_spend", "--out", str(out),
                   "--html", str(tmp_path / "html")) == 0
    reasons = pd.read_parquet(out)
    assert reasons["customer_id"].tolist() == ["c001"] * 4 + ["long"] * 4
    assert reasons["rank"].tolist() == [1, 2, 3, 4] * 2
    assert set(reasons["output"]) == {"horizon_spend"} and reasons["converged"].all()
    for _, group in reasons.groupby("customer_id"):  # ranked by the size of the contribution
        assert np.all(np.diff(group["contribution"].abs().to_numpy()) <= 0)
    events = pd.read_parquet(tmp_path / "reasons.events.parquet")
    assert events.groupby("customer_id").size().to_dict() == {"c001": 24, "long": 32}  # max_len 32
    assert {"attr_type", "attr_amount", "attr_gap", "attr_calendar", "attr_numeric:balance",
            "attr_categorical:channel", "attr_total"} <= set(events.columns)
    page = (tmp_path / "html" / "customer_long.html").read_text()
    assert page.count("<rect") == 32 and reasons["text"].iloc[4] in page
    assert 'href="customer_c001.html"' in (tmp_path / "html" / "index.html").read_text()


def test_json_holds_every_term_adding_up(explain_repo, events_file, tmp_path):
    out = tmp_path / "reasons.json"
    assert explain("--repo", str(explain_repo), "--model", MODEL, "--events", events_file,
                   "--customers", "c003", "--output", "next_event_probs:salary", "--top", "2",
                   "--out", str(out)) == 0
    (customer,) = json.loads(out.read_text())["customers"]
    assert customer["output"] == "next_event_probs[salary]" and len(customer["reasons"]) == 2
    total = sum(e["attr_total"] for e in customer["events"]) + sum(customer["history"].values())
    gap = customer["prediction"] - customer["reference"]
    assert total - gap == pytest.approx(customer["convergence_delta"], abs=1e-9)
    assert abs(customer["convergence_delta"]) <= 1e-3 * abs(gap)


def test_checkpoint(tiny_checkpoint, events_csv, tmp_path, capsys):
    out = tmp_path / "reasons.json"
    assert explain("--ckpt", str(tiny_checkpoint), "--events", events_csv, "--customers",
                   "c000", "--out", str(out)) == 0
    assert "1 customers explained (churn_prob; largest convergence delta" in capsys.readouterr().out
    assert json.loads(out.read_text())["customers"][0]["customer_id"] == "c000"


@pytest.mark.parametrize(("args", "words"), [
    (["--customers", "c001", "nobody"], "customer(s) ['nobody'] have no event in"),
    (["--output", "churn"], "unknown output 'churn'; expected one of"),
    (["--output", "next_event_probs:rent"], "unknown event type 'rent'"),
    (["--output", "next_time_quantiles"], "cannot be explained"),
    (["--top", "0"], "top must be >= 1"),
])
def test_bad_input_exits_2(explain_repo, events_file, tmp_path, capsys, args, words):
    out = tmp_path / "reasons.json"
    assert explain("--repo", str(explain_repo), "--model", MODEL, "--events", events_file,
                   "--out", str(out), *args) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_bad_sources_exit_2(explain_repo, events_file, tmp_path, capsys):
    out = str(tmp_path / "reasons.json")
    assert explain("--repo", str(explain_repo), "--model", "other", "--events", events_file,
                   "--out", out) == 2
    assert "no explanation model 'other_explain' in" in capsys.readouterr().err
    assert explain("--events", events_file, "--out", out) == 2
    assert "give exactly one of --ckpt PATH or --repo DIR" in capsys.readouterr().err
    assert explain("--repo", str(explain_repo), "--model", MODEL, "--events", events_file,
                   "--out", str(tmp_path / "reasons.csv")) == 2
    assert "expected a .parquet or .json file" in capsys.readouterr().err


@pytest.mark.slow  # an ONNX export with its parity check
def test_export_writes_the_explanation_model_of_the_checkpoint(tiny_checkpoint, events_csv,
                                                                 tmp_path):
    repo = tmp_path / "repo"
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo), "--name", "twin",
                 "--no-live"]) == 0
    assert sorted(p.name for p in (repo / "twin_explain" / "1").iterdir()) == [
        "fintwin.json", "fintwin.sha256", "model.py", "twin.pt"]
    documents = []
    for source in (["--ckpt", str(tiny_checkpoint)], ["--repo", str(repo), "--model", "twin"]):
        out = tmp_path / f"{len(documents)}.json"
        assert explain(*source, "--events", events_csv, "--customers", "c004", "c007",
                       "--output", "horizon_count", "--out", str(out)) == 0
        documents.append(json.loads(out.read_text()))
    assert documents[0] == documents[1]
