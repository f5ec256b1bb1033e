"""Training run: config checks, instantiate, fit, test, quality report, metrics.json.

``train.py`` is the Hydra entry point; this module holds the reusable steps so tests can
drive a run through Hydra's compose API.

Runs repeat exactly: the same command and seed on the same machine write the same
metrics.json on CPU (``trainer.deterministic``, seeded samplers), and a run resumed from
any checkpoint, mid-epoch included, continues as the uninterrupted run would (the training
loader's place in the epoch and the random generators' states are checkpointed).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fintwin.data.datamodule import ResumableLoader
from fintwin.errors import FintwinInputError
from fintwin.files import write_atomic, write_json_atomic
from fintwin.models.checkpoint import read_checkpoint
from fintwin.models.encoders import ENCODERS
from fintwin.privacy import DifferentialPrivacy, check_private_run, privacy_config

log = logging.getLogger(__name__)


def _lands_on_cuda(accelerator: str) -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def precision_for(accelerator: str) -> str:
    """bf16-mixed where the run lands on a bf16-capable CUDA GPU, fp32 otherwise."""
    on_gpu = _lands_on_cuda(accelerator)
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def deterministic_for(accelerator: str) -> bool | str:
    """``True`` off CUDA (reruns are bit-identical); ``"warn"`` on CUDA, where deterministic
    kernels are used where they exist and the others (the float cumulative sums of the
    encoders among them) warn instead of raising."""
    return "warn" if _lands_on_cuda(accelerator) else True


def register_resolvers() -> None:
    """OmegaConf resolvers used by the configs."""
    OmegaConf.register_new_resolver("fintwin_precision", precision_for, replace=True)
    OmegaConf.register_new_resolver("fintwin_deterministic", deterministic_for, replace=True)


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
    if cfg.get("privacy"):
        check_private_run(cfg)


def random_states() -> dict[str, Any]:
    """States of the global random generators (torch, CUDA, NumPy, Python), as plain tensors
    and tuples so that checkpoints holding them load with ``weights_only``."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what ``random_states`` returned."""
    torch.set_rng_state(states["torch"])
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = dict(numpy_state["state"])
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class ExactResume(pl.Callback):
    """Puts into every checkpoint what a resumed run needs, beyond Lightning's own state, to
    go on exactly as the uninterrupted run: the global random generators' states and the
    training loader's place in its epoch, both restored as training starts again.

    (Lightning saves a stateful loader's place itself but does not restore it when
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, as ours does:
    Lightning-AI/pytorch-lightning#20550.)
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        loader = self._trainer.train_dataloader if self._trainer else None
        place = loader.state_dict() if isinstance(loader, ResumableLoader) else None
        return {"random": random_states(), "train_loader": place}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        loader = trainer.train_dataloader
        if self._pending["train_loader"] is not None and isinstance(loader, ResumableLoader):
            loader.load_state_dict(self._pending["train_loader"])
        set_random_states(self._pending["random"])
        self._pending = None


def _instantiate_all(section: DictConfig | None) -> list:
    return [instantiate(item) for item in (section or {}).values() if item and "_target_" in item]


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """DataModule (set up), model sized from it, and trainer with callbacks and loggers;
    with ``privacy`` set, the ``DifferentialPrivacy`` callback first (it swaps in the DP
    layers before any other callback copies the model)."""
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    model = instantiate(
        cfg.model,
        vocab_size=datamodule.spec.vocab.size,
        scaling=datamodule.model_scaling,
        horizon_days=datamodule.spec.horizon_days,
        n_numeric=datamodule.spec.n_numeric,
        categorical_sizes=list(datamodule.spec.categorical_sizes),
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    privacy = privacy_config(cfg)
    if privacy is not None:
        callbacks.insert(0, DifferentialPrivacy(privacy))
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=_instantiate_all(cfg.get("logger")) or False,
    )
    return datamodule, model, trainer


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return getattr(callback, "best_model_path", None) or None


def _relative_path(path: str, root: Path) -> str:
    """``path`` relative to ``root`` when it lies inside it, as given otherwise."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return path


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, test with the best checkpoint, write metrics.json and config.yaml; return metrics.

    ``best_checkpoint`` in the metrics is relative to the run directory (``paths.output_dir``),
    so reruns of one command write identical files.
    """
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    for callback in trainer.callbacks:
        if isinstance(callback, DifferentialPrivacy):
            metrics.update(callback.metrics())
    best = _best_checkpoint(trainer)
    if cfg.get("test"):
        if best:  # the served weights; trainer.test(ckpt_path=) restores the raw ones under EMA
            model.load_state_dict(read_checkpoint(best)["state_dict"])
        results = trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()})
        from fintwin.models.quality import quality_report

        metrics.update(quality_report(model, datamodule))
    metrics["best_checkpoint"] = _relative_path(best, out_dir) if best else ""
    if trainer.is_global_zero:
        write_json_atomic(out_dir / "metrics.json", metrics)
        write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            "metrics: %s",
            json.dumps({k: v for k, v in metrics.items() if k.startswith("test/")}, indent=1),
        )
    return metrics
