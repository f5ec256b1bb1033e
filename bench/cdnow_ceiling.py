"""How far below BG/NBD can a blend of the forecasts go if it may peek at the holdout?

Reads a ``fintwin report`` directory's ``forecasts.parquet`` and fits, by least squares on
the holdout transactions themselves, ``a + b * bgnbd + c * twin`` (with or without ``d *
twin_heads``) and each model alone (``a + b * model``), cross-fitted over ``--folds`` random
folds of customers: every customer's blend is fitted on the other folds' holdout counts. No forecaster may do this (it uses the
holdout), so the RMSE it reaches bounds from below what re-weighting or blending these
forecasts could ever give on this split.

Run:  python bench/cdnow_ceiling.py outputs/twin_cdnow/ensemble [--folds 5] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from fintwin.twin.pipeline import FORECASTS_FILE

BLENDS = {
    "BG/NBD": ["bgnbd"],
    "twin": ["twin"],
    "twin_heads": ["twin_heads"],
    "BG/NBD + twin": ["bgnbd", "twin"],
    "all three": ["bgnbd", "twin", "twin_heads"],
}


def cross_fitted(features: np.ndarray, target: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Least-squares predictions of ``target``, each fold's from a fit on the other folds."""
    design = np.column_stack([np.ones(len(target)), features])
    prediction = np.empty(len(target))
    for k in np.unique(fold):
        held = fold == k
        coef, *_ = np.linalg.lstsq(design[~held], target[~held], rcond=None)
        prediction[held] = design[held] @ coef
    return prediction


def rmse(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((prediction - target) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("report_dir", type=Path, help="a fintwin report --out directory")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    forecasts = pd.read_parquet(args.report_dir / FORECASTS_FILE)
    fold = np.random.default_rng(args.seed).integers(0, args.folds, len(forecasts))
    table = Table(title=f"{args.report_dir}: holdout transactions RMSE, {args.folds} folds")
    for column in ("forecast", "as is", "blend fitted on the holdout (cross-fitted)"):
        table.add_column(column, justify="right")
    target = forecasts["txn"].to_numpy(float)
    for name, models in BLENDS.items():
        features = forecasts[[f"{m}_pred_txn" for m in models]].to_numpy(float)
        as_is = f"{rmse(features[:, 0], target):.4f}" if len(models) == 1 else "-"
        blended = rmse(cross_fitted(features, target, fold), target)
        table.add_row(name, as_is, f"{blended:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
