"""The same command with the same seed on the same machine writes the same metrics.json."""

import json

import pytest
import torch

from fintwin.training import deterministic_for
from tests.test_train import compose_cfg, tiny_overrides, train_process


def test_two_processes_with_different_hash_seeds_write_identical_metrics(tmp_path, events_csv):
    """String hashing differs between processes (PYTHONHASHSEED); nothing may depend on it."""
    runs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}"
        args = [*tiny_overrides(events_csv, "lstm"), f"hydra.run.dir={out}"]
        result = train_process(args, tmp_path, env={"PYTHONHASHSEED": hash_seed})
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append((out / "metrics.json").read_text())
    assert runs[0] == runs[1]
    metrics = json.loads(runs[0])
    assert metrics["best_checkpoint"].startswith("checkpoints/epoch_")
    assert metrics["test/loss"] > 0


def test_default_trainer_is_deterministic_off_cuda(tmp_path, events_csv):
    cfg = compose_cfg(tmp_path, tiny_overrides(events_csv, "lstm", trainer="default"))
    assert cfg.trainer.deterministic == ("warn" if torch.cuda.is_available() else True)


@pytest.mark.parametrize(
    "accelerator, cuda, expected",
    [("cpu", True, True), ("auto", False, True), ("auto", True, "warn"), ("gpu", True, "warn")],
)
def test_deterministic_setting_follows_the_device(monkeypatch, accelerator, cuda, expected):
    """CUDA has kernels without a deterministic version (float cumsum): there they warn."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert deterministic_for(accelerator) == expected
