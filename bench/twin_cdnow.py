"""CDNOW twin vs BG/NBD + Gamma-Gamma at several cut-offs, mean over seeds.

For every cut-off and seed: ``python train.py seed=S data.cutoff=C [overrides]`` trains a twin
on the calibration weeks up to the cut-off (checkpoint chosen inside calibration by the run's
``optimized_metric``), then ``fintwin report`` forecasts the holdout up to 1998-06-30 with
rollouts (``twin``), the direct heads (``twin_heads``) and BG/NBD. The cut-offs are the
standard split's 1997-09-30 (weeks 1-39, a 39-week holdout) and, by default, 1997-12-31 (a
26-week holdout). Per cut-off it prints the mean and standard deviation over the seeds of every
metric, each twin forecast's difference from BG/NBD, and the issue's targets (RMSE of transactions
and spend >= 5% below BG/NBD, totals within +-5%, AUROC above BG/NBD), then where the
transaction errors come from: customers grouped by their number of repeat purchases in the
calibration weeks, with the mean actual and forecast holdout transactions and each group's
share of the mean squared error (averaged over the seeds). The seeds' twins are also scored
together, as an ensemble (``fintwin report --ckpt`` with every seed's checkpoint: the mean
of their forecasts). Last, the scores of the predictive distributions (``fintwin.twin.scores``:
log score, RPS, PIT KS distance, interval coverage) of the rollouts and of BG/NBD at every
cut-off: mean ± sd over the seeds, the first seed alone (what ``make demo`` trains, at the
standard cut-off) and the ensemble, with their targets (log score and RPS better than BG/NBD,
80% intervals covering 77-83%). Per-seed runs and reports, and the ensemble's, stay under
``--out`` (the standard cut-off's directly, a later one's under ``cutoff_<date>/``).

Run:  python bench/twin_cdnow.py [--seeds 0 1 2] [--cutoffs 1997-09-30 1997-12-31]
                                 [--out outputs/twin_cdnow]
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
CUTOFF, HOLDOUT_END = "1997-09-30", "1998-06-30"  # the standard split
LATER_CUTOFF = "1997-12-31"
TWIN_FORECASTS = ("twin", "twin_heads")  # rollouts and direct heads
MODELS = (*TWIN_FORECASTS, "bgnbd")
FREQUENCY_BINS = [-1, 0, 1, 2, 4, 8, 16, 32, 1000]  # repeat purchases in calibration
RMSE_GAIN = 0.05  # the twin's RMSE must be at least 5% below BG/NBD's
TOTAL_TOLERANCE = 5.0  # percent
COVER80 = (0.77, 0.83)  # the twin's 80% intervals must cover this share of actuals
SCORE_COLUMNS = {  # the distribution scores in the summary table, by their headers
    "txn_log_score": "log score",
    "txn_rps": "RPS",
    "txn_pit_ks": "PIT KS",
    "txn_cover50": "cov50",
    "txn_cover80": "cov80",
    "txn_cover80_expected": "cov80 exp.",
    "txn_pit_cover80": "PIT cov80",
    "spend_cover80": "spend cov80",
    "spend_pit_cover80": "spend PIT cov80",
}
Reports = list[dict[str, dict[str, float]]]


def cutoff_dir(out: Path, cutoff: str) -> Path:
    """Where one cut-off's runs go: ``out`` for the standard split, else a subdirectory."""
    return out if cutoff == CUTOFF else out / f"cutoff_{cutoff}"


def best_checkpoint(run_dir: Path) -> Path:
    """The run's selected checkpoint (``epoch_*.ckpt``; ``last.ckpt`` is not selected)."""
    chosen = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    if len(chosen) != 1:
        raise RuntimeError(f"{run_dir}: expected one selected checkpoint, found {chosen}")
    return chosen[0]


def write_report(
    ckpts: list[Path], out: Path, seed: int, cutoff: str = CUTOFF
) -> dict[str, dict[str, float]]:
    """``fintwin report`` of one checkpoint or an ensemble of several; returns its metrics."""
    report = [
        sys.executable, "-m", "fintwin.cli", "report", "--ckpt", *map(str, ckpts),
        "--data", "cdnow", "--cutoff", cutoff, "--holdout-end", HOLDOUT_END,
        "--out", str(out), "--seed", str(seed),
    ]  # fmt: skip
    subprocess.run(report, cwd=REPO, check=True)
    return json.loads((out / "metrics.json").read_text())


def run_seed(
    seed: int, out: Path, overrides: list[str], cutoff: str = CUTOFF
) -> dict[str, dict[str, float]]:
    """Train with ``seed`` on the data up to ``cutoff``, write the report next to the run,
    return its metrics."""
    run_dir = out / f"seed{seed}"
    train = [sys.executable, "train.py", f"seed={seed}", f"data.cutoff={cutoff}",
             f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
    subprocess.run(train, cwd=REPO, check=True)
    return write_report([best_checkpoint(run_dir)], run_dir / "report", seed, cutoff)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def versus_bgnbd(metric: str, value: float, bgnbd: float) -> str:
    """Difference from BG/NBD: points for a total's error, percent otherwise."""
    if metric.endswith("pct_err"):
        return f"{value - bgnbd:+.2f} pts"
    return f"{100 * (value / bgnbd - 1):+.1f}%"


def results_table(
    runs: list[dict[str, dict[str, float]]],
    ensemble: dict[str, dict[str, float]],
    cutoff: str = CUTOFF,
) -> Table:
    """Per metric: each model's mean ± sd over the seeds and the ensemble's forecasts, then
    each twin forecast's difference from BG/NBD."""
    title = (
        f"CDNOW cut-off {cutoff}, holdout to {HOLDOUT_END}: mean ± sd over {len(runs)} seeds, "
        "and the ensemble of their twins"
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


def frequency_table(out: Path, seeds: list[int], cutoff: str = CUTOFF) -> Table:
    """Holdout transactions by calibration frequency: means and shares of the MSE."""
    events, _ = load_events("cdnow", same_day_merge=True)
    frequency = rfm_summary(events, cutoff)["frequency"]
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
    table = Table(
        title=f"cut-off {cutoff}: holdout transactions by calibration repeat purchases "
        "(mean over seeds)"
    )
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


def verdicts(checks: dict[str, bool]) -> str:
    """``name: met, other: NOT met``."""
    return ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks.items())


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
        lines.append(f"{label}: {verdicts(target_checks(reports, model))}")
    return lines


def score_rows(
    runs: Reports, ensemble: dict[str, dict[str, float]], first_seed: int
) -> list[tuple[str, list[str]]]:
    """Rows of the distribution summary for one cut-off: the rollouts' mean ± sd over the
    seeds, the first seed's, the ensemble's, and BG/NBD's."""
    twin = [mean_sd([run["twin"][key] for run in runs]) for key in SCORE_COLUMNS]
    return [
        (f"twin, {len(runs)} seeds", twin),
        (f"twin, seed {first_seed}", [f"{runs[0]['twin'][key]:.3f}" for key in SCORE_COLUMNS]),
        ("ensemble twin", [f"{ensemble['twin'][key]:.3f}" for key in SCORE_COLUMNS]),
        ("BG/NBD", [f"{runs[0]['bgnbd'][key]:.3f}" for key in SCORE_COLUMNS]),
    ]


def scores_table(by_cutoff: dict[str, tuple[Reports, dict]], first_seed: int) -> Table:
    """The predictive distributions' scores at every cut-off (``SCORE_COLUMNS``)."""
    table = Table(
        title=f"predictive distributions of holdout transactions (and spend) to {HOLDOUT_END}",
        caption="log score: mean log P(actual count), higher is better; RPS: lower is better; "
        "cov50 / cov80: share of actuals inside the central 50% / 80% interval, exp.: a "
        "calibrated model's; PIT cov80: PIT mass in the central 80%",
    )
    for column in ("cut-off", "forecast", *SCORE_COLUMNS.values()):
        table.add_column(column, justify="right", no_wrap=True)
    for cutoff, (runs, ensemble) in by_cutoff.items():
        for label, cells in score_rows(runs, ensemble, first_seed):
            table.add_row(cutoff, label, *cells)
    return table


def score_checks(reports: Reports) -> dict[str, bool]:
    """The distribution targets for the rollouts, on the mean over ``reports``."""

    def mean(name: str, metric: str) -> float:
        return statistics.mean(report[name][metric] for report in reports)

    low, high = COVER80
    return {
        "log score above BG/NBD": mean("twin", "txn_log_score") > mean("bgnbd", "txn_log_score"),
        "RPS below BG/NBD": mean("twin", "txn_rps") < mean("bgnbd", "txn_rps"),
        f"80% intervals cover {low:.0%}-{high:.0%}": low <= mean("twin", "txn_cover80") <= high,
        f"PIT 80% cover {low:.0%}-{high:.0%}": low <= mean("twin", "txn_pit_cover80") <= high,
    }


def score_lines(by_cutoff: dict[str, tuple[Reports, dict]]) -> list[str]:
    """The distribution targets at every cut-off, for the seeds, the first one and the
    ensemble."""
    lines = []
    for cutoff, (runs, ensemble) in by_cutoff.items():
        for label, reports in (("twin", runs), ("first seed", runs[:1]), ("ensemble", [ensemble])):
            lines.append(f"{cutoff} {label}: {verdicts(score_checks(reports))}")
    return lines


def run_cutoff(
    cutoff: str, seeds: list[int], out: Path, overrides: list[str]
) -> tuple[Reports, dict[str, dict[str, float]]]:
    """Every seed's run and report at ``cutoff``, and the ensemble of their twins."""
    runs = [run_seed(seed, out, overrides, cutoff) for seed in seeds]
    members = [best_checkpoint(out / f"seed{seed}") for seed in seeds]
    return runs, write_report(members, out / "ensemble", seeds[0], cutoff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cutoffs", nargs="+", default=[CUTOFF, LATER_CUTOFF],
                        help="last calibration days (the holdout ends on 1998-06-30)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "twin_cdnow")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    out = args.out.resolve()
    by_cutoff = {
        cutoff: run_cutoff(cutoff, args.seeds, cutoff_dir(out, cutoff), args.overrides)
        for cutoff in args.cutoffs
    }
    console = Console(width=180)
    console.print(f"{started}, {machine()}, overrides: {' '.join(args.overrides) or 'none'}")
    for cutoff, (runs, ensemble) in by_cutoff.items():
        console.print(results_table(runs, ensemble, cutoff))
        for line in target_lines(runs, ensemble):
            console.print(line)
        console.print(frequency_table(cutoff_dir(out, cutoff), args.seeds, cutoff))
    console.print(scores_table(by_cutoff, args.seeds[0]))
    for line in score_lines(by_cutoff):
        console.print(line)


if __name__ == "__main__":
    main()
