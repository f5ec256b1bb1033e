"""What differential privacy costs and buys: twins trained without DP and with DP-SGD
(``privacy=dp``) at several target epsilons, side by side.

Per row, two runs (same settings but ``privacy``):

- synthetic bank (``experiment=synthetic_lstm`` at a small scale): oracle skill of the selected
  checkpoint on the test customers (``quality_report``'s ``test/oracle_skill``);
- CDNOW (the default LSTM twin, calibration weeks 1-39): RMSE of the holdout transactions
  (weeks 40-78) per customer, forecast by the direct heads as ``fintwin report``'s
  ``twin_heads`` (BG/NBD's RMSE on the same split is printed under the table).

Both runs are then attacked by membership inference: a loss threshold telling training
customers from held-out ones. Each customer's score is minus their mean event NLL under the
twin (the ``per_event_log_likelihood`` terms over their calibration history); the AUC of that
score over the test customers and as many training customers (drawn with a fixed seed) is the
attack's success: 0.5 is chance. ``privacy/epsilon`` is the accountant's final epsilon
(the budget is planned for ``trainer.max_epochs``; early stopping only spends less). Train
seconds: ``trainer.fit`` alone, CPU, ``torch.set_num_threads(2)``.

Run:  python bench/privacy.py [--epsilons 8 3 1] [--customers 1000] [--epochs 3]
                              [--cdnow-source cdnow_sample] [--cdnow-epochs 1] [--hidden 32]
                              [--max-len 32] [--batch-size 32] [--warmup 5] [--lr 0.01]

The defaults keep the table (8 trainings, 6 of them private) small enough for 2 busy cores:
a private step costs 3-6x an ordinary one (per-customer gradients; the DPLSTM runs its time
steps in Python), so the models are small, the schedules short, the CDNOW column uses its
2,357-customer sample (``cdnow_sample``, the tenth of the BG/NBD paper) without the weight
average (its ~500-step window outlasts the run); batch 32 and lr 0.01 (instead of 64 and
the config's 3e-3) take more, larger steps in so short a schedule. The numbers are those of
short runs, far from the converged twins of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fitting import fit
from machine_info import machine
from torchmetrics.functional.classification import binary_auroc

from fintwin.data.datamodule import EventDataModule
from fintwin.models.module import TwinModule
from fintwin.models.quality import quality_report
from fintwin.privacy import DifferentialPrivacy
from fintwin.twin.evaluation import forecast_metrics, holdout_actuals
from fintwin.twin.forecast import heads_forecast
from fintwin.twin.pipeline import fit_baseline, parse_window

THREADS = 2
CUTOFF, HOLDOUT_END = "1997-09-30", "1998-06-30"
ATTACK_SEED = 0
QUIET = [
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "logger=[]",
    "callbacks.rich_progress_bar=null",
    "callbacks.learning_rate_monitor=null",
]


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """Sizes and schedule of every run."""
    return [
        *QUIET,
        f"data.max_len={args.max_len}",
        f"data.batch_size={args.batch_size}",
        f"model.encoder.hidden_size={args.hidden}",
        f"model.warmup_steps={args.warmup}",
        f"model.lr={args.lr}",
    ]


def synthetic_overrides(args: argparse.Namespace) -> list[str]:
    """The small synthetic bank run of every row."""
    return [
        "experiment=synthetic_lstm",
        *shared_overrides(args),
        f"trainer.max_epochs={args.epochs}",
        f"data.simulator.n_customers={args.customers}",
    ]


def cdnow_overrides(args: argparse.Namespace) -> list[str]:
    """The default CDNOW twin on ``--cdnow-source`` with fewer epochs."""
    return [
        "data=cdnow",
        f"data.source={args.cdnow_source}",
        *shared_overrides(args),
        f"trainer.max_epochs={args.cdnow_epochs}",
        "callbacks.weight_average=null",  # an average over ~500 steps needs many more epochs
    ]


def privacy_overrides(epsilon: float | None) -> list[str]:
    """Nothing without DP; ``privacy=dp`` at ``epsilon`` otherwise."""
    return [] if epsilon is None else ["privacy=dp", f"privacy.target_epsilon={epsilon}"]


def train(extra: list[str], out_dir: Path) -> tuple[EventDataModule, TwinModule, dict]:
    """Train as ``train.py`` does and load the selected checkpoint's served weights; the
    datamodule, the model and the fit's seconds and spent epsilon."""
    run = fit(extra, out_dir)
    trainer = run.trainer
    spent = [c.spent()["epsilon"] for c in trainer.callbacks if isinstance(c, DifferentialPrivacy)]
    return run.datamodule, run.model, {"seconds": run.seconds,
                                       "epsilon": spent[0] if spent else None}


@torch.no_grad()
def customer_nll(model: TwinModule, datamodule: EventDataModule, index: np.ndarray) -> np.ndarray:
    """Each customer's mean event NLL (next-event and censored terms of their history)."""
    out = []
    for lo in range(0, len(index), 256):
        batch = datamodule.sequences.batch(index[lo : lo + 256])
        ll = model.per_event_log_likelihood(batch)
        total = (ll["type"] + ll["gap"] + ll["amount"] + ll["censored"]).sum(dim=1)
        terms = (ll["observed"] | ll["censored_mask"]).sum(dim=1).clamp(min=1)
        out.append((-total / terms).numpy())
    return np.concatenate(out)


def membership_auc(model: TwinModule, datamodule: EventDataModule) -> float:
    """AUC of the loss-threshold attack: training (members) against test customers."""
    held_out = datamodule.splits["test"]
    rng = np.random.default_rng(ATTACK_SEED)
    members = rng.choice(datamodule.splits["train"], size=len(held_out), replace=False)
    nll = customer_nll(model, datamodule, np.concatenate([members, held_out]))
    labels = torch.cat([torch.ones(len(members)), torch.zeros(len(held_out))]).long()
    return float(binary_auroc(torch.from_numpy(-nll), labels))


def synthetic_row(epsilon: float | None, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="fintwin-bench-") as out_dir:
        extra = synthetic_overrides(args) + privacy_overrides(epsilon)
        datamodule, model, fit = train(extra, Path(out_dir))
    skill = quality_report(model, datamodule)["test/oracle_skill"]
    return {"skill": skill, "auc": membership_auc(model, datamodule), **fit}


def cdnow_row(epsilon: float | None, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="fintwin-bench-") as out_dir:
        datamodule, model, fit = train(cdnow_overrides(args) + privacy_overrides(epsilon),
                                       Path(out_dir))
    events, spec = datamodule.events, datamodule.spec
    sequences = spec.sequences(events, CUTOFF)
    forecast = heads_forecast(model, sequences, HOLDOUT_END, spec.horizon_days)
    actual = holdout_actuals(events, *parse_window(CUTOFF, HOLDOUT_END, "holdout_end"))
    rmse = forecast_metrics(forecast, actual)["txn_rmse"]
    return {"rmse": rmse, "auc": membership_auc(model, datamodule), "events": events, **fit}


def bgnbd_rmse(events: pd.DataFrame) -> float:
    """BG/NBD's transactions RMSE on the same split (the reference of the CDNOW column)."""
    cut, last = parse_window(CUTOFF, HOLDOUT_END, "holdout_end")
    actual = holdout_actuals(events, cut, last)
    return forecast_metrics(fit_baseline(events, cut).predict(last), actual)["txn_rmse"]


def _epsilon(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cdnow-source", default="cdnow_sample")
    parser.add_argument("--cdnow-epochs", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = {}
    for epsilon in [None, *args.epsilons]:
        rows[epsilon] = (synthetic_row(epsilon, args), cdnow_row(epsilon, args))
    load = os.getloadavg()
    print(f"{datetime.date.today()}  {machine()}, {THREADS} threads, load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end")
    print(f"every run: LSTM hidden {args.hidden}, max_len {args.max_len}, batch "
          f"{args.batch_size} (expected size of the Poisson batches under DP), warm-up "
          f"{args.warmup} steps, lr {args.lr:g}; synthetic bank: {args.customers:,} customers, {args.epochs} "
          f"epochs; CDNOW ({args.cdnow_source}): {args.cdnow_epochs} epochs; DP: delta "
          "min(1e-5, 0.1 / training customers), clipping norm 1, prv accountant\n")
    print("| target epsilon | spent epsilon (synthetic / CDNOW) | oracle skill | attack AUC "
          "synthetic | CDNOW txn RMSE | attack AUC CDNOW | train s synthetic | train s CDNOW |")
    print("|---" * 8 + "|")
    for epsilon, (synthetic, cdnow) in rows.items():
        print(
            f"| {'no DP' if epsilon is None else f'{epsilon:g}'} "
            f"| {_epsilon(synthetic['epsilon'])} / {_epsilon(cdnow['epsilon'])} "
            f"| {synthetic['skill']:.3f} | {synthetic['auc']:.3f} | {cdnow['rmse']:.3f} "
            f"| {cdnow['auc']:.3f} | {synthetic['seconds']:.0f} | {cdnow['seconds']:.0f} |"
        )
    events = rows[None][1]["events"]
    print(f"\nBG/NBD on the same CDNOW split: transactions RMSE {bgnbd_rmse(events):.3f}")


if __name__ == "__main__":
    main()
