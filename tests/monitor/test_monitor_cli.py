"""`fintwin monitor` on a repository exported from the tiny checkpoint: its own calibration
events give PSI 0 for every input and output, a changed file is flagged, bad input exits 2."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from fintwin.cli import main
from fintwin.monitor.drift import OUTPUTS, REFERENCE_KEY
from tests.monitor.conftest import LIVE, MODEL

pytestmark = pytest.mark.slow  # the shared export: about 40 s


@pytest.fixture
def calibration(events_csv, tmp_path):
    events = pd.read_csv(events_csv, parse_dates=["timestamp"])
    return events[events["timestamp"] < pd.Timestamp("2024-07-01")]  # the tiny run's cut-off


def test_the_calibration_events_do_not_drift_from_their_own_reference(
        monitored_repo, calibration, tmp_path, capsys):
    calibration.to_csv(tmp_path / "calibration.csv", index=False)
    out = tmp_path / "report"
    assert main(["monitor", "--repo", str(monitored_repo), "--model", MODEL, "--events",
                 str(tmp_path / "calibration.csv"), "--out", str(out)]) == 0
    report = json.loads((out / "drift.json").read_text())
    assert set(OUTPUTS) <= set(report["overall"])  # outputs from the live step graph
    assert {name: entry["psi"] for name, entry in report["overall"].items()} == {
        name: 0.0 for name in report["overall"]}
    assert report["drifted"] == [] and report["reference"]["events"] == len(calibration)
    assert sum(window["events"] for window in report["windows"]) == len(calibration)
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Drift of" in page
    assert (out / "psi_over_time.png").stat().st_size > 0
    assert "0 drifted" in capsys.readouterr().out


def test_a_changed_file_is_flagged(monitored_repo, calibration, tmp_path):
    changed = calibration.assign(amount=calibration["amount"] * 20, event_type="transfer")
    changed.to_csv(tmp_path / "changed.csv", index=False)
    out = tmp_path / "report"
    assert main(["monitor", "--repo", str(monitored_repo), "--model", MODEL, "--events",
                 str(tmp_path / "changed.csv"), "--out", str(out), "--window", "W"]) == 0
    report = json.loads((out / "drift.json").read_text())
    assert report["overall"]["amount"]["level"] == "act"
    assert report["overall"]["event_type"]["level"] == "act"
    assert {"amount", "event_type"} <= set(report["drifted"])
    assert len(report["windows"]) >= 20  # weeks of the half year


def test_bad_monitor_input_exits_2_naming_the_problem(monitored_repo, events_csv, tmp_path,
                                                      capsys):
    args = ["--events", events_csv, "--out", str(tmp_path / "out")]
    assert main(["monitor", "--repo", str(monitored_repo), "--model", "nope", *args]) == 2
    assert "no version of model 'nope'" in capsys.readouterr().err
    assert main(["monitor", "--repo", str(monitored_repo), "--model", MODEL, "--window",
                 "fortnight", *args]) == 2
    assert "--window 'fortnight'" in capsys.readouterr().err
    assert main(["monitor", "--repo", str(monitored_repo), "--model", MODEL, "--watch", "0.5",
                 "--act", "0.2", *args]) == 2
    assert "expected 0 < watch <= act" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(monitored_repo, bare)
    metadata = bare / MODEL / "1" / "fintwin.json"
    metadata.write_text(json.dumps({k: v for k, v in json.loads(metadata.read_text()).items()
                                    if k != REFERENCE_KEY}))
    assert main(["monitor", "--repo", str(bare), "--model", MODEL, *args]) == 2
    assert "holds no drift reference" in capsys.readouterr().err
    assert (bare / LIVE).is_dir()


def test_export_with_unreadable_reference_data_exits_2_and_writes_nothing(
        tiny_checkpoint, tmp_path, capsys):
    repo = tmp_path / "repo"
    missing = tmp_path / "missing.csv"
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo),
                 "--reference-data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--reference-data {missing}" in err and "Traceback" not in err
    assert not repo.exists()


def test_without_a_live_model_only_the_inputs_are_compared(monitored_repo, calibration,
                                                           tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(monitored_repo / MODEL, repo / MODEL)
    calibration.to_csv(tmp_path / "calibration.csv", index=False)
    out = tmp_path / "report"
    assert main(["monitor", "--repo", str(repo), "--model", MODEL, "--events",
                 str(tmp_path / "calibration.csv"), "--out", str(out)]) == 0
    overall = json.loads((out / "drift.json").read_text())["overall"]
    assert {"event_type", "amount", "gap_days", "history_length"} <= set(overall)
    assert not set(OUTPUTS) & set(overall)
