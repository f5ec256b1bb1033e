"""Train a customer twin: python train.py [hydra overrides]  (see configs/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from fintwin.errors import FintwinInputError
from fintwin.training import register_resolvers, run

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Fit, test and report; returns the optimised metric for sweepers."""
    try:
        metrics = run(cfg)
    except FintwinInputError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
