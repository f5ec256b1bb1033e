"""One training run as ``train.py`` does it, for benchmarks that train several twins in one
process: compose the config with overrides, fit, and load the selected checkpoint's weights."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from fintwin.data.datamodule import EventDataModule
from fintwin.models.checkpoint import read_checkpoint
from fintwin.models.module import TwinModule
from fintwin.training import build, register_resolvers

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Fitted:
    """A fitted run: its data, its model with the selected checkpoint's weights (eval mode),
    its trainer and the seconds ``trainer.fit`` took."""

    datamodule: EventDataModule
    model: TwinModule
    trainer: pl.Trainer
    seconds: float


def fit(overrides: list[str], out_dir: Path) -> Fitted:
    """Train with ``configs/train.yaml`` and ``overrides``, writing into ``out_dir``."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, model, trainer = build(cfg)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - started
    model.load_state_dict(read_checkpoint(trainer.checkpoint_callback.best_model_path)["state_dict"])
    return Fitted(datamodule, model.eval(), trainer, seconds)
