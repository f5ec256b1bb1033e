"""The forecast report directory: metrics.json, PNG plots and report.html."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fintwin.twin.evaluation import METRIC_KEYS, forecast_metrics, week_ends
from fintwin.twin.report import PLOT_FILES, TRACKING_FILE, write_report

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
