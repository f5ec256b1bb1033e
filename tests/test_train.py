"""train.py end to end through Hydra's compose API (and as a process for sweeps and DDP)."""

import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict

from fintwin.errors import FintwinInputError
from fintwin.models.checkpoint import load_twin
from fintwin.training import build, register_resolvers, run

ROOT = Path(__file__).resolve().parents[1]
MISSING_KEY = object()
TINY = [
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.early_stopping=null",
    "data.batch_size=16",
    "data.cutoff=2024-06-30",
    "model.encoder.hidden_size=16",
    "model.n_components=2",
    "model.warmup_steps=2",
]


def compose_cfg(out_dir: Path, overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def tiny_overrides(events_csv: str, model: str, trainer: str = "cpu") -> list[str]:
    return [f"model={model}", f"trainer={trainer}", "data=csv", f"data.source={events_csv}", *TINY]


@pytest.mark.parametrize("model", ["lstm", "transformer"])
def test_train_end_to_end(tmp_path, events_csv, model):
    metrics = run(compose_cfg(tmp_path, tiny_overrides(events_csv, model)))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "test/loss",
        "test/type_acc",
        "test/type_nll",
        "test/time_nll",
        "test/time_mae",
        "test/amount_mae",
        "test/churn_auroc",
        "test/baseline_population_time_nll",
    ):
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    assert 0 <= saved["test/type_acc"] <= 1 and saved["test/time_mae"] > 0
    assert (tmp_path / saved["best_checkpoint"]).is_file()  # relative to the run directory
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert f"name: {model}" in (tmp_path / "config.yaml").read_text()


def test_checkpoints_hold_the_weight_average(tmp_path, events_csv):
    """``state_dict`` is the EMA of the weights, which ``load_twin`` serves; the raw weights
    are kept for resuming."""
    run(compose_cfg(tmp_path, tiny_overrides(events_csv, "lstm") + ["test=false"]))
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == current.keys()
    name = "encoder.lstm.weight_ih_l0"
    assert not torch.allclose(averaged[name], current[name])
    torch.testing.assert_close(load_twin(last).model.state_dict()[name], averaged[name])


def test_test_metrics_score_the_served_weights(tmp_path, events_csv):
    """metrics.json's test loss is that of the checkpoint's served (averaged) weights."""
    cfg = compose_cfg(tmp_path, tiny_overrides(events_csv, "lstm"))
    metrics = run(cfg)
    datamodule, _, trainer = build(cfg)
    served = load_twin(tmp_path / metrics["best_checkpoint"]).model
    results = trainer.test(served, datamodule=datamodule, verbose=False)[0]
    assert results["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_resume_from_last_checkpoint_continues_global_step(tmp_path, events_csv):
    first = compose_cfg(tmp_path / "a", tiny_overrides(events_csv, "lstm") + ["test=false"])
    run(first)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    step_before = torch.load(last, weights_only=True)["global_step"]
    resumed = compose_cfg(
        tmp_path / "b",
        tiny_overrides(events_csv, "lstm")
        + ["test=false", "trainer.max_epochs=4", f"ckpt_path={last}"],
    )
    run(resumed)
    step_after = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)[
        "global_step"
    ]
    assert step_before > 0 and step_after == 2 * step_before


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.encoder.hidden_size=-4", "model.encoder.hidden_size"),
        ("data.horizon_days=0", "data.horizon_days"),
        ("model.encoder.name=gru", "model.encoder.name"),
    ],
)
def test_bad_config_values_name_the_key(tmp_path, events_csv, override, key):
    cfg = compose_cfg(tmp_path, tiny_overrides(events_csv, "lstm") + [override])
    with pytest.raises(FintwinInputError, match=key.replace(".", r"\.")):
        run(cfg)


def _data_keys_named_in_strings(package: Path) -> dict[str, str]:
    """``data.*`` config keys that string literals (messages, docstrings) of ``package`` name."""
    named = {}
    for path in sorted(package.rglob("*.py")):
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.STRING:
                for key in re.findall(r"(?<![\w./])data\.[a-z_]+(?:\.[a-z_]+)*", token.string):
                    named.setdefault(key, str(path.relative_to(ROOT)))
    return named


def test_config_keys_named_by_messages_exist(tmp_path):
    """Every ``data.*`` key the package names (``data.schema.allow_negative_amount`` in the
    refusal of a negative amount, ...) is a key of the data configs."""
    configs = [compose_cfg(tmp_path, [f"data={name}"]) for name in ("cdnow", "csv", "synthetic")]
    named = _data_keys_named_in_strings(ROOT / "fintwin")
    assert {"data.schema.allow_negative_amount", "data.split", "data.max_len"} <= set(named)
    missing = {
        key: where for key, where in named.items()
        if not any(OmegaConf.select(cfg, key, default=MISSING_KEY) is not MISSING_KEY
                   for cfg in configs)
    }  # fmt: skip
    assert missing == {}


def test_unknown_model_name_fails_at_compose(tmp_path):
    with pytest.raises(MissingConfigException, match="model/gru"):
        compose_cfg(tmp_path, ["model=gru"])


def train_process(
    args: list[str], cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in its own process (``env`` added to this one's environment)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_optuna_two_trial_sweep_writes_summary(tmp_path, events_csv):
    sweep_dir = tmp_path / "sweep"
    result = train_process(
        [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            f"hydra.sweep.dir={sweep_dir}",
            *tiny_overrides(events_csv, "lstm"),
            "trainer.max_epochs=1",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (sweep_dir / "sweep_summary.md").read_text()
    assert "Sweep summary (2 trials)" in summary and "Best parameters" in summary
    assert (sweep_dir / "trials.csv").read_text().count("\n") == 3
    assert (sweep_dir / "optimization_results.yaml").is_file()


@pytest.mark.slow
def test_ddp_on_cpu_two_processes(tmp_path, events_csv):
    out = tmp_path / "ddp"
    result = train_process(
        [
            *tiny_overrides(events_csv, "lstm", trainer="ddp"),
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            f"hydra.run.dir={out}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "world_size=2" in result.stderr
        or "distributed_backend=gloo" in result.stderr + result.stdout
    )
    assert json.loads((out / "metrics.json").read_text())["test/type_acc"] >= 0
