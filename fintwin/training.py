"""Training run: config checks, instantiate, fit, test, quality report, metrics.json.

``train.py`` is the Hydra entry point; this module holds the reusable steps so tests can
drive a run through Hydra's compose API.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fintwin.errors import FintwinInputError
from fintwin.models.checkpoint import read_checkpoint
from fintwin.models.encoders import ENCODERS

log = logging.getLogger(__name__)


def precision_for(accelerator: str) -> str:
    """bf16-mixed where the run lands on a bf16-capable CUDA GPU, fp32 otherwise."""
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def register_resolvers() -> None:
    """OmegaConf resolvers used by the configs."""
    OmegaConf.register_new_resolver("fintwin_precision", precision_for, replace=True)


def _require(cfg: DictConfig, key: str, ok, expected: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or not ok(value):
        raise FintwinInputError(f"config key {key}={value!r}: expected {expected}")


def validate_config(cfg: DictConfig) -> None:
    """Fail at start-up, naming the key, on values that would only fail deep inside a run."""
    _require(cfg, "model.encoder.name", lambda v: v in ENCODERS, f"one of {sorted(ENCODERS)}")
    positive_int = lambda v: isinstance(v, int) and v > 0  # noqa: E731
    for key in (
        "model.encoder.hidden_size",
        "model.encoder.num_layers",
        "model.n_components",
        "data.max_len",
        "data.batch_size",
    ):
        _require(cfg, key, positive_int, "a positive integer")
    _require(cfg, "model.encoder.dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
    _require(cfg, "model.lr", lambda v: v > 0, "a positive learning rate")
    _require(cfg, "data.horizon_days", lambda v: v > 0, "a positive number of days")
    if cfg.model.encoder.name == "transformer":
        _require(
            cfg,
            "model.encoder.num_heads",
            lambda v: isinstance(v, int) and v > 0 and cfg.model.encoder.hidden_size % v == 0,
            "a positive integer dividing model.encoder.hidden_size",
        )


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _instantiate_all(section: DictConfig | None) -> list:
    return [instantiate(item) for item in (section or {}).values() if item and "_target_" in item]


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """DataModule (set up), model sized from it, and trainer with callbacks and loggers."""
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    model = instantiate(
        cfg.model,
        vocab_size=datamodule.vocab.size,
        scaling=datamodule.scaling,
        horizon_days=datamodule.horizon_days,
        n_numeric=datamodule.n_numeric,
    )
    trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
    )
    return datamodule, model, trainer


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return getattr(callback, "best_model_path", None) or None


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, test with the best checkpoint, write metrics.json and config.yaml; return metrics."""
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        best = _best_checkpoint(trainer)
        if best:  # the served weights; trainer.test(ckpt_path=) restores the raw ones under EMA
            model.load_state_dict(read_checkpoint(best)["state_dict"])
        results = trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()})
        from fintwin.models.quality import quality_report

        metrics.update(quality_report(model, datamodule))
    metrics["best_checkpoint"] = _best_checkpoint(trainer) or ""
    if trainer.is_global_zero:
        write_json_atomic(out_dir / "metrics.json", metrics)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            "metrics: %s",
            json.dumps({k: v for k, v in metrics.items() if k.startswith("test/")}, indent=1),
        )
    return metrics
