"""The forecast report directory: metrics.json, PNG plots and report.html."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fintwin.twin.evaluation import METRIC_KEYS, forecast_metrics, week_ends
from fintwin.twin.report import PIT_FILE, PIT_PLOT, PLOT_FILES, TRACKING_FILE, write_report
from fintwin.twin.scores import SCORE_KEYS

CUTOFF, HOLDOUT_END = "2024-03-31", "2024-06-30"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def inputs() -> dict:
    rng = np.random.default_rng(0)
    index = pd.Index([f"c{i}" for i in range(40)], name="customer_id")
    txn = rng.poisson(1.0, len(index))
    actual = pd.DataFrame({"txn": txn, "spend": txn * rng.gamma(2.0, 10.0, len(index))}, index)
    predictions = {
        name: pd.DataFrame(
            {
                "pred_txn": actual["txn"] * scale + 0.1,
                "pred_spend": actual["spend"] * scale + 1.0,
                "p_any": rng.uniform(size=len(index)),
            },
            index=index,
        )
        for name, scale in (("twin", 1.0), ("twin_heads", 0.8), ("bgnbd", 1.2))
    }
    metrics = {name: forecast_metrics(pred, actual) for name, pred in predictions.items()}
    metrics["bgnbd"]["auroc_any"] = float("nan")
    grid = week_ends("2024-01-01", HOLDOUT_END)
    steps = np.arange(1.0, len(grid) + 1)
    tracking = pd.DataFrame(
        {"actual": 3 * steps, "bgnbd": 2.9 * steps, "twin": 3.1 * steps}, index=grid
    )
    return {"metrics": metrics, "tracking": tracking, "predictions": predictions, "actual": actual}


def test_report_directory(tmp_path: Path, inputs: dict) -> None:
    out = tmp_path / "report"
    page_path = write_report(out, **inputs, cutoff=CUTOFF, holdout_end=HOLDOUT_END)
    assert page_path == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.json", "report.html", TRACKING_FILE, *PLOT_FILES]
    )
    tracking = pd.read_csv(out / TRACKING_FILE, index_col="week_end", parse_dates=True)
    pd.testing.assert_frame_equal(tracking, inputs["tracking"], check_names=False, check_freq=False)

    written = json.loads((out / "metrics.json").read_text())
    assert list(written) == ["twin", "twin_heads", "bgnbd"]
    for name, values in written.items():
        assert tuple(values) == METRIC_KEYS
        for key in METRIC_KEYS:
            if name == "bgnbd" and key == "auroc_any":
                assert values[key] is None  # NaN is written as null
            else:
                assert values[key] == pytest.approx(inputs["metrics"][name][key])

    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000

    page = page_path.read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOT_FILES)
    assert "2024-03-31" in page and "2024-04-01" in page and "2024-06-30" in page
    for name, values in inputs["metrics"].items():
        assert f"<th>{name}</th>" in page
        for key in METRIC_KEYS:
            assert f"<th>{key}</th>" in page
            shown = "n/a" if np.isnan(values[key]) else f"{values[key]:.4g}"
            assert f"<td>{shown}</td>" in page


def test_report_needs_a_model(tmp_path: Path, inputs: dict) -> None:
    inputs["predictions"] = {}
    with pytest.raises(ValueError, match="at least one model"):
        write_report(tmp_path, **inputs, cutoff=CUTOFF, holdout_end=HOLDOUT_END)
    assert list(tmp_path.iterdir()) == []


def test_distribution_scores_join_the_metrics_with_a_pit_plot(
    tmp_path: Path, inputs: dict
) -> None:
    scores = {name: dict.fromkeys(SCORE_KEYS, 0.5) for name in ("twin", "bgnbd")}
    scores["bgnbd"]["txn_rps"] = 0.25
    pit = {
        "twin": {"txn": np.full(10, 1.0), "spend": np.linspace(0.55, 1.45, 10)},
        "bgnbd": {"txn": np.linspace(1.45, 0.55, 10), "spend": np.full(10, 1.0)},
    }
    out = tmp_path / "report"
    write_report(out, **inputs, cutoff=CUTOFF, holdout_end=HOLDOUT_END, scores=scores, pit=pit)
    written = json.loads((out / "metrics.json").read_text())
    assert tuple(written["twin"]) == METRIC_KEYS + SCORE_KEYS
    assert tuple(written["twin_heads"]) == METRIC_KEYS
    assert written["bgnbd"]["txn_rps"] == 0.25
    assert (out / PIT_PLOT).read_bytes().startswith(PNG_SIGNATURE)
    table = pd.read_csv(out / PIT_FILE)
    assert list(table.columns) == [
        "bin_start", "bin_end", "twin_txn", "twin_spend", "bgnbd_txn", "bgnbd_spend"
    ]  # fmt: skip
    np.testing.assert_allclose(table["bin_end"], np.linspace(0.1, 1.0, 10))
    np.testing.assert_allclose(table["bgnbd_txn"], pit["bgnbd"]["txn"])
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOT_FILES) + 1
    distributions = page.split("<h2>Predictive distributions</h2>")[1]
    assert "<td>0.25</td>" in distributions and "<th>twin_heads</th>" not in distributions


def test_distribution_scores_need_their_pit_histograms(tmp_path: Path, inputs: dict) -> None:
    scores = {"twin": dict.fromkeys(SCORE_KEYS, 0.5)}
    with pytest.raises(ValueError, match="expected the same models"):
        write_report(tmp_path, **inputs, cutoff=CUTOFF, holdout_end=HOLDOUT_END, scores=scores)
    assert list(tmp_path.iterdir()) == []
