"""Epoch by epoch on CDNOW: does what training can see track the holdout forecast?

Trains one twin keeping every epoch's checkpoint (``python train.py seed=S`` with all
checkpoints kept and early stopping off), then prints for each epoch:

- ``val/event_nll``, the checkpoint-selection metric (the run's ``metrics.csv``);
- a forecast inside the calibration window for the run's validation customers: history up
  to the end of week 26, rollouts over weeks 27-39, RMSE and total error of transactions
  (what a selection rule could use without touching the holdout);
- the holdout forecast of every customer (weeks 40-78): RMSE and total error.

Only the last columns read the holdout; nothing here feeds back into training.

Run:  python bench/cdnow_epochs.py [--seed 2] [--samples 50] [--out outputs/cdnow_epochs]
                                   [-- train.py overrides]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
from hydra.utils import instantiate
from machine_info import machine
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from fintwin.twin.evaluation import forecast_metrics, holdout_actuals
from fintwin.twin.forecast import rollout_forecast
from fintwin.twin.pipeline import load_model, read_events, rollout_config
from fintwin.twin.rollout import rollout

REPO = Path(__file__).resolve().parents[1]
INNER_CUTOFF, CUTOFF, HOLDOUT_END = "1997-07-01", "1997-09-30", "1998-06-30"  # weeks 26, 39, 78


def train_every_epoch(seed: int, run_dir: Path, overrides: list[str]) -> None:
    """``python train.py`` keeping all epoch checkpoints, without early stopping or test."""
    command = [
        sys.executable, "train.py", f"seed={seed}", f"hydra.run.dir={run_dir}", "test=false",
        "+callbacks.model_checkpoint.save_top_k=-1", "callbacks.early_stopping=null", *overrides,
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True)


def validation_customers(run_dir: Path) -> pd.Index:
    """The run's validation customers (its data config and seed give the same split)."""
    data = instantiate(OmegaConf.load(run_dir / "config.yaml").data)
    data.setup()
    return pd.Index(data.sequences.customer_ids[data.splits["val"]])


def forecast_errors(
    ckpt: Path,
    events: pd.DataFrame,
    customers: pd.Index | None,
    window: tuple[str, str],
    samples: int,
    seed: int,
) -> dict[str, float]:
    """Rollout forecast metrics of ``customers`` (all when None) over (cutoff, end]."""
    cutoff, end = window
    twin = load_model(ckpt, "cpu")
    if customers is not None:
        events = events[events["customer_id"].isin(customers)]
    config = replace(rollout_config(events, samples, seed, max_steps=1000), progress=False)
    result = rollout(
        twin.model, twin.spec.sequences(events, cutoff), twin.spec.vocab, pd.Timestamp(end), config
    )
    return forecast_metrics(rollout_forecast(result), holdout_actuals(events, cutoff, end))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--samples", type=int, default=50, help="rollout samples per customer")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "cdnow_epochs")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    run_dir = args.out.resolve() / f"seed{args.seed}"
    train_every_epoch(args.seed, run_dir, args.overrides)
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    val_nll = metrics.dropna(subset=["val/event_nll"]).set_index("epoch")["val/event_nll"]
    customers = validation_customers(run_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    events = read_events(load_model(checkpoints[0], "cpu"), "cdnow")  # read once
    table = Table(
        title=f"CDNOW, seed {args.seed}, {args.samples} samples: {started}, {machine()}"
    )
    for column in ("epoch", "val event NLL", "weeks 27-39 RMSE (val)", "total %",
                   "holdout RMSE (all)", "total %"):  # fmt: skip
        table.add_column(column, justify="right")
    for ckpt in checkpoints:
        epoch = int(ckpt.stem.split("_")[1])
        inner = forecast_errors(
            ckpt, events, customers, (INNER_CUTOFF, CUTOFF), args.samples, args.seed
        )
        outer = forecast_errors(ckpt, events, None, (CUTOFF, HOLDOUT_END), args.samples, args.seed)
        table.add_row(
            str(epoch), f"{val_nll.loc[epoch]:.4f}",
            f"{inner['txn_rmse']:.4f}", f"{inner['txn_total_pct_err']:+.1f}",
            f"{outer['txn_rmse']:.4f}", f"{outer['txn_total_pct_err']:+.1f}",
        )  # fmt: skip
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
