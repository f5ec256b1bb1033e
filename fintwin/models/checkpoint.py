"""Load a trained twin and the data settings it was trained with from a Lightning checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fintwin.data.features import Vocab
from fintwin.errors import FintwinInputError
from fintwin.models.module import TwinModule

DATA_STATE_KEY = "EventDataModule"


@dataclass
class TrainedTwin:
    """A twin in eval mode plus the featuriser settings and split it was trained on."""

    model: TwinModule
    data: dict

    @property
    def vocab(self) -> Vocab:
        """Event-type vocabulary of training."""
        return Vocab.from_dict(self.data["vocab"])

    @property
    def observation_end(self) -> pd.Timestamp:
        """End of the calibration period the model saw (nothing after it entered training)."""
        return pd.Timestamp(self.data["observation_end"])


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dictionary on the CPU (weights only, no unpickling of code).

    Its ``state_dict`` holds the served weights: the weight average when training kept one
    (the raw weights are then in ``current_model_state``, for resuming).
    """
    path = Path(path)
    if not path.is_file():
        raise FintwinInputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FintwinInputError(
            f"{path}: not a readable checkpoint ({err.__class__.__name__}: {err})"
        ) from err


def load_twin(path: str | Path) -> TrainedTwin:
    """Read a checkpoint written by ``train.py`` with its served weights."""
    ckpt = read_checkpoint(path)
    if DATA_STATE_KEY not in ckpt or "hyper_parameters" not in ckpt:
        raise FintwinInputError(
            f"{path}: not a fintwin checkpoint (no data settings or hyper-parameters)"
        )
    model = TwinModule(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return TrainedTwin(model.eval(), ckpt[DATA_STATE_KEY])
