"""What a categorical event field is worth: the synthetic bank with its channel on, a twin
trained with the channel declared and one trained without it, scored against the oracle.

Both runs compose ``experiment=synthetic_channel`` (the channel shifts the next event's type,
gap and amount; see ``fintwin.data.simulator``) at a small scale: the same world, split,
seed and schedule; the second run drops the field (``data.schema.categorical_features=[]``).
The oracle conditions on the channels in both rows (it knows the world), so the gap between
the rows is what the field gives the model. Train seconds: ``trainer.fit`` alone, on the
CPU (``torch.set_num_threads(2)``), no progress bar.

Run:  python bench/categorical.py [--customers 3000] [--epochs 10] [--hidden 64] [--max-len 64]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from fitting import fit
from machine_info import machine

from fintwin.models.quality import quality_report

THREADS = 2
COLUMNS = ("test/model_nll", "test/oracle_nll", "test/oracle_skill")
RUNS = {"with field": [], "without field": ["data.schema.categorical_features=[]"]}


def overrides(customers: int, epochs: int, hidden: int, max_len: int) -> list[str]:
    """The small-scale CPU run shared by both rows."""
    return [
        "experiment=synthetic_channel",
        "trainer=cpu",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "logger=[]",
        "callbacks.rich_progress_bar=null",
        "callbacks.early_stopping=null",
        "callbacks.learning_rate_monitor=null",
        f"data.simulator.n_customers={customers}",
        f"data.max_len={max_len}",
        f"model.encoder.hidden_size={hidden}",
    ]


def train_and_score(extra: list[str], out_dir: Path) -> dict[str, float]:
    """Train as ``train.py`` does, test the selected checkpoint; its oracle metrics and the
    seconds ``trainer.fit`` took."""
    run = fit(extra, out_dir)
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)
    return quality_report(run.model, run.datamodule) | {"train seconds": run.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    shared = overrides(args.customers, args.epochs, args.hidden, args.max_len)
    rows = {}
    for name, extra in RUNS.items():
        with tempfile.TemporaryDirectory(prefix="fintwin-bench-") as out_dir:
            rows[name] = train_and_score(shared + extra, Path(out_dir))
    print(f"{datetime.date.today()}  {machine()}, {THREADS} threads; synthetic bank with its "
          f"channel, {args.customers:,} customers, LSTM hidden {args.hidden}, max_len "
          f"{args.max_len}, {args.epochs} epochs\n")
    print("| model | " + " | ".join(COLUMNS) + " | train seconds |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name, metrics in rows.items():
        values = " | ".join(f"{metrics[column]:.3f}" for column in COLUMNS)
        print(f"| {name} | {values} | {metrics['train seconds']:.0f} |")


if __name__ == "__main__":
    main()
