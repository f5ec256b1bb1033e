"""Load a trained twin, its featuriser spec and its split from a Lightning checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fintwin.data.features import FeaturiserSpec, stored_spec
from fintwin.errors import FintwinInputError
from fintwin.models.module import TwinModule

DATA_STATE_KEY = "EventDataModule"
SPLIT_KEYS = ("source", "cutoff", "observation_end", "simulator")
PRIVACY_KEY = "privacy"  # the privacy budget spent up to the checkpoint (fintwin.privacy)


@dataclass
class TrainedTwin:
    """A twin in eval mode, the featuriser spec it was trained with, and its split:
    ``source``, ``cutoff``, ``observation_end`` and ``simulator`` (its config, or None).
    ``privacy``: the budget its weights were trained with under ``privacy=dp``
    (``fintwin.privacy.DifferentialPrivacy.spent``), None otherwise."""

    model: TwinModule
    spec: FeaturiserSpec
    split: dict
    privacy: dict | None = None

    @property
    def observation_end(self) -> pd.Timestamp:
        """End of the calibration period the model saw (nothing after it entered training)."""
        return pd.Timestamp(self.split["observation_end"])


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
    """Read a checkpoint written by ``train.py`` with its served weights.

    Checkpoints written before ``FeaturiserSpec`` load through its one converter
    (``FeaturiserSpec.from_legacy``).
    """
    ckpt = read_checkpoint(path)
    if DATA_STATE_KEY not in ckpt or "hyper_parameters" not in ckpt:
        raise FintwinInputError(
            f"{path}: not a fintwin checkpoint (no data settings or hyper-parameters)"
        )
    model = TwinModule(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    state = ckpt[DATA_STATE_KEY]
    spec = stored_spec(state, str(path))
    split = {key: state.get(key) for key in SPLIT_KEYS}
    return TrainedTwin(model.eval(), spec, split, ckpt.get(PRIVACY_KEY))
