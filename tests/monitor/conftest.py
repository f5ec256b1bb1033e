"""A model repository exported from the tiny checkpoint (batch and live model, with the drift
reference of its calibration events), shared by the monitoring tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fintwin.cli import main

MODEL, LIVE = "twin", "twin_live"


@pytest.fixture(scope="session")
def monitored_repo(tmp_path_factory, tiny_checkpoint) -> Path:
    repo = tmp_path_factory.mktemp("monitored") / "repo"
    assert main(["export", "--ckpt", str(tiny_checkpoint), "--repo", str(repo), "--name", MODEL]) == 0
    return repo
