"""CDNOW twin vs BG/NBD + Gamma-Gamma on the standard split, mean over seeds.

For every seed: ``python train.py seed=S [overrides]`` trains a twin on the calibration
weeks 1-39 (checkpoint chosen inside calibration by the run's ``optimized_metric``), then
``fintwin report`` forecasts weeks 40-78 with rollouts (``twin``), the direct heads
(``twin_heads``) and BG/NBD. Prints the mean and standard deviation over the seeds of every
metric, each twin forecast's difference from BG/NBD, and the issue's targets (RMSE of transactions
and spend >= 5% below BG/NBD, totals within +-5%, AUROC above BG/NBD), then where the
transaction errors come from: customers grouped by their number of repeat purchases in the
calibration weeks, with the mean actual and forecast holdout transactions and each group's
share of the mean squared error (averaged over the seeds). The seeds' twins are also scored
together, as an ensemble (``fintwin report --ckpt`` with every seed's checkpoint: the mean
of their forecasts). Per-seed runs and reports, and the ensemble's, stay under ``--out``.

Run:  python bench/twin_cdnow.py [--seeds 0 1 2] [--out outputs/twin_cdnow]
                                 [-- train.py overrides, e.g. trainer.max_epochs=6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from machine_info import machine
from rich.console import Console
from rich.table import Table

from fintwin.data.sources import load_events
from fintwin.twin.baselines import rfm_summary
from fintwin.twin.evaluation import METRIC_KEYS
from fintwin.twin.pipeline import FORECASTS_FILE

REPO = Path(__file__).resolve().parents[1]
CUTOFF, HOLDOUT_END = "1997-09-30", "1998-06-30"
TWIN_FORECASTS = ("twin", "twin_heads")  # rollouts and direct heads
MODELS = (*TWIN_FORECASTS, "bgnbd")
FREQUENCY_BINS = [-1, 0, 1, 2, 4, 8, 16, 32, 1000]  # repeat purchases in calibration
RMSE_GAIN = 0.05  # the twin's RMSE must be at least 5% below BG/NBD's
TOTAL_TOLERANCE = 5.0  # percent


def best_checkpoint(run_dir: Path) -> Path:
    """The run's selected checkpoint (``epoch_*.ckpt``; ``last.ckpt`` is not selected)."""
    chosen = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    if len(chosen) != 1:
        raise RuntimeError(f"{run_dir}: expected one selected checkpoint, found {chosen}")
    return chosen[0]


def write_report(ckpts: list[Path], out: Path, seed: int) -> dict[str, dict[str, float]]:
    """``fintwin report`` of one checkpoint or an ensemble of several; returns its metrics."""
    report = [
        sys.executable, "-m", "fintwin.cli", "report", "--ckpt", *map(str, ckpts),
        "--data", "cdnow", "--cutoff", CUTOFF, "--holdout-end", HOLDOUT_END,
        "--out", str(out), "--seed", str(seed),
    ]  # fmt: skip
    subprocess.run(report, cwd=REPO, check=True)
    return json.loads((out / "metrics.json").read_text())


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Train with ``seed``, write the report next to the run, return its metrics."""
    run_dir = out / f"seed{seed}"
    train = [sys.executable, "train.py", f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(train, cwd=REPO, check=True)
    return write_report([best_checkpoint(run_dir)], run_dir / "report", seed)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def versus_bgnbd(metric: str, value: float, bgnbd: float) -> str:
    """Difference from BG/NBD: points for a total's error, percent otherwise."""
    if metric.endswith("pct_err"):
        return f"{value - bgnbd:+.2f} pts"
    return f"{100 * (value / bgnbd - 1):+.1f}%"


def results_table(
    runs: list[dict[str, dict[str, float]]], ensemble: dict[str, dict[str, float]]
) -> Table:
    """Per metric: each model's mean ± sd over the seeds and the ensemble's forecasts, then
    each twin forecast's difference from BG/NBD."""
    title = (
        f"CDNOW holdout {HOLDOUT_END}: mean ± sd over {len(runs)} seeds, and the ensemble "
        "of their twins"
    )
    table = Table(title=title)
    together = [f"ensemble {m}" for m in TWIN_FORECASTS]
    versus = [f"{m} vs BG/NBD" for m in (*TWIN_FORECASTS, *together)]
    table.add_column("metric", no_wrap=True)
    for column in (*MODELS, *together, *versus):
        table.add_column(column, justify="right")
    for metric in METRIC_KEYS:
        means = {m: statistics.mean(run[m][metric] for run in runs) for m in MODELS}
        bgnbd = means["bgnbd"]
        cells = [mean_sd([run[m][metric] for run in runs]) for m in MODELS]
        joint = [ensemble[m][metric] for m in TWIN_FORECASTS]
        forecasts = [means[m] for m in TWIN_FORECASTS] + joint
        gains = [versus_bgnbd(metric, value, bgnbd) for value in forecasts]
        table.add_row(metric, *cells, *(f"{v:.3f}" for v in joint), *gains)
    return table


def bin_label(interval: pd.Interval) -> str:
    """``3-4`` for the integers in (2, 4]; ``33+`` for the last, open-ended bin."""
    first, last = int(interval.left) + 1, int(interval.right)
    if last == FREQUENCY_BINS[-1]:
        return f"{first}+"
    return str(last) if first == last else f"{first}-{last}"


def frequency_table(out: Path, seeds: list[int]) -> Table:
    """Holdout transactions by calibration frequency: means and shares of the MSE."""
    events, _ = load_events("cdnow", same_day_merge=True)
    frequency = rfm_summary(events, CUTOFF)["frequency"]
    groups = []
    for seed in seeds:
        forecasts = pd.read_parquet(out / f"seed{seed}" / "report" / FORECASTS_FILE)
        forecasts = forecasts.set_index("customer_id").join(frequency)
        squared = {m: (forecasts["txn"] - forecasts[f"{m}_pred_txn"]) ** 2 for m in MODELS}
        frame = pd.DataFrame(
            {
                "bin": pd.cut(forecasts["frequency"], FREQUENCY_BINS),
                "actual": forecasts["txn"],
                **{m: forecasts[f"{m}_pred_txn"] for m in MODELS},
                **{f"mse {m}": squared[m] / len(forecasts) for m in MODELS},
            }
        )
        groups.append(frame.groupby("bin", observed=True).agg(
            customers=("actual", "size"), **{c: (c, "mean") for c in ("actual", *MODELS)},
            **{f"mse {m}": (f"mse {m}", "sum") for m in MODELS},
        ))  # fmt: skip
    mean = sum(groups) / len(groups)
    table = Table(title="holdout transactions by calibration repeat purchases (mean over seeds)")
    for column in ("repeat purchases", *mean.columns):
        table.add_column(column, justify="right")
    for interval, row in mean.iterrows():
        cells = (f"{v:.3f}" for v in row.iloc[1:])
        table.add_row(bin_label(interval), f"{row['customers']:.0f}", *cells)
    total = mean.sum()
    table.add_row("all", f"{total['customers']:.0f}", *[""] * (1 + len(MODELS)),
                  *(f"{total[f'mse {m}']:.3f}" for m in MODELS))  # fmt: skip
    return table


def target_checks(reports: list[dict[str, dict[str, float]]], model: str) -> dict[str, bool]:
    """The issue's targets for ``model``, on the mean over ``reports``."""

    def mean(name: str, metric: str) -> float:
        return statistics.mean(report[name][metric] for report in reports)

    return {
        "txn RMSE >= 5% below BG/NBD": mean(model, "txn_rmse")
        <= (1 - RMSE_GAIN) * mean("bgnbd", "txn_rmse"),
        "spend RMSE >= 5% below BG/NBD": mean(model, "spend_rmse")
        <= (1 - RMSE_GAIN) * mean("bgnbd", "spend_rmse"),
        "txn total within ±5%": abs(mean(model, "txn_total_pct_err")) <= TOTAL_TOLERANCE,
        "spend total within ±5%": abs(mean(model, "spend_total_pct_err")) <= TOTAL_TOLERANCE,
        "AUROC above BG/NBD": mean(model, "auroc_any") > mean("bgnbd", "auroc_any"),
    }


def target_lines(
    runs: list[dict[str, dict[str, float]]], ensemble: dict[str, dict[str, float]]
) -> list[str]:
    """The targets, checked for the rollouts and the direct heads, per seed and ensembled."""
    lines = []
    for label, model, reports in (
        ("twin", "twin", runs),
        ("twin_heads", "twin_heads", runs),
        ("ensemble twin", "twin", [ensemble]),
        ("ensemble twin_heads", "twin_heads", [ensemble]),
    ):
        checks = target_checks(reports, model)
        verdicts = ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks.items())
        lines.append(f"{label}: {verdicts}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "twin_cdnow")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    out = args.out.resolve()
    runs = [run_seed(seed, out, args.overrides) for seed in args.seeds]
    members = [best_checkpoint(out / f"seed{seed}") for seed in args.seeds]
    ensemble = write_report(members, out / "ensemble", args.seeds[0])
    console = Console(width=180)
    console.print(f"{started}, {machine()}, overrides: {' '.join(args.overrides) or 'none'}")
    console.print(results_table(runs, ensemble))
    for line in target_lines(runs, ensemble):
        console.print(line)
    console.print(frequency_table(out, args.seeds))


if __name__ == "__main__":
    main()
