"""Drift: PSI of shifted and unshifted synthetic banks and of CDNOW's holdout months against
the calibration reference that `fintwin export` stores, and the cost of the drift histograms
per event on the live serving path.

Two small LSTM twins are trained (``python train.py``, ``--epochs`` epochs, hidden 32) and
exported (``fintwin export``: the reference is their calibration events):

- Synthetic bank (1,000 customers, max_len 64, calibration to 2023-09-30). Compared over
  the calibration months: a fresh draw of the same world (another seed: should not be
  flagged), the same world with cash withdrawals more likely (+1 and +2 on their type logit
  in every segment: their share of events goes from 9% to 20% and 36%) and with a new segment
  mix (small businesses 70% instead of 20%); then the base world per quarter, the last one
  the holdout.
- CDNOW (calibration weeks 1-39, to 1997-09-30): the PSI of every month from January 1997 to
  June 1998 against the calibration reference (``fintwin monitor --window M``).

Cost: the live model in process (``LiveModel.answer``: read and featurise the events, load
the states from SQLite, step, store) on the synthetic holdout events in time order, in
requests of 1 and 64 events, against the drift histograms of the same requests (the applied
events' watched values binned into the sliding window, ``ModelMetrics.observe_drift`` without
the gauge refresh), and the refresh (PSI of every quantity and the drifted counts) that a
served model runs at most once a second. Both models step the same events, interleaved.

Run:  python bench/drift.py [--epochs 1] [--out outputs/drift] [--parts synthetic cost cdnow]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from machine_info import machine
from rich.console import Console
from rich.table import Table

from fintwin.data.simulator import EVENT_TYPES, SimulatorConfig, simulate
from fintwin.live.events import read_events
from fintwin.live.store import open_store
from fintwin.live.triton_model import LiveModel
from fintwin.live.twins import open_live_twins
from fintwin.monitor.drift import REFERENCE_KEY, Reference, SlidingWindow, Thresholds
from fintwin.monitor.metrics import ModelMetrics, PrometheusSink
from fintwin.monitor.offline import monitor, version_metadata
from fintwin.monitor.served import applied_values

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CUSTOMERS = 1000
SYNTHETIC_CUTOFF, CDNOW_CUTOFF = "2023-09-30", "1997-09-30"
COST_EVENTS = 4096
PARTS = ("synthetic", "cost", "cdnow")


def train_and_export(name: str, overrides: list[str], out: Path, epochs: int) -> Path:
    """Train a small LSTM twin, export it to ``out/repo``; return the repository."""
    run_dir, repo = out / f"{name}_run", out / "repo"
    common = [f"trainer.max_epochs={epochs}", "trainer=cpu", "model.encoder.hidden_size=32",
              "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
              f"hydra.run.dir={run_dir}"]
    subprocess.run([sys.executable, "train.py", *overrides, *common], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    ckpt = run_dir / json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]
    subprocess.run([sys.executable, "-m", "fintwin.cli", "export", "--ckpt", str(ckpt),
                    "--repo", str(repo), "--name", name], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return repo


def world(**changes) -> SimulatorConfig:
    return SimulatorConfig(n_customers=SYNTHETIC_CUSTOMERS, **changes)


def more_cash(config: SimulatorConfig, logit: float) -> SimulatorConfig:
    """``config`` with ``logit`` added to the cash withdrawals' type logit in every segment."""
    cash = EVENT_TYPES.index("cash_withdrawal")
    config.type_logits = [[v + logit * (j == cash) for j, v in enumerate(row)]
                          for row in config.type_logits]
    return config


def psi_table(title: str, columns: dict[str, dict[str, float]], thresholds: Thresholds) -> Table:
    table = Table(title=title)
    table.add_column("quantity")
    for name in columns:
        table.add_column(name, justify="right")
    names = list(dict.fromkeys(q for values in columns.values() for q in values))
    for quantity in names:
        table.add_row(quantity, *(f"{columns[c].get(quantity, float('nan')):.3f}" for c in columns))
    table.add_row("drifted (>= watch / >= act)", *(
        f"{sum(v >= thresholds.watch for v in values.values())} / "
        f"{sum(v >= thresholds.act for v in values.values())}" for values in columns.values()))
    return table


def synthetic(out: Path, epochs: int, console: Console) -> Path:
    repo = train_and_export("bank", ["experiment=synthetic_lstm", "data.max_len=64",
                                     f"data.simulator.n_customers={SYNTHETIC_CUSTOMERS}"],
                            out / "synthetic", epochs)
    end = pd.Timestamp(SYNTHETIC_CUTOFF) + pd.Timedelta(days=1)
    worlds = {
        "same world, new draw": world(seed=1),
        "cash logit +1": more_cash(world(seed=1), 1.0),
        "cash logit +2": more_cash(world(seed=1), 2.0),
        "new segment mix": world(seed=1, segment_prior=[0.1, 0.1, 0.1, 0.7]),
    }
    columns, thresholds = {}, Thresholds()
    for label, config in worlds.items():
        events = simulate(config)
        path = out / "synthetic" / f"{''.join(c if c.isalnum() else '_' for c in label)}.parquet"
        events[events["timestamp"] < end].to_parquet(path, index=False)
        report = monitor(repo, "bank", str(path), path.with_suffix(""), "M", thresholds)
        columns[label] = report.overall
    console.print(psi_table(f"Synthetic bank ({SYNTHETIC_CUSTOMERS:,} customers): PSI over the "
                            f"calibration months (to {SYNTHETIC_CUTOFF}) vs the reference",
                            columns, thresholds))
    base = simulate(world(seed=0))
    path = out / "synthetic" / "base_world.parquet"
    base.to_parquet(path, index=False)
    report = monitor(repo, "bank", str(path), out / "synthetic" / "base_world", "Q", thresholds)
    quarters = {str(start.date()): row.drop("events").to_dict()
                for start, row in report.windows.iterrows()}
    console.print(psi_table("Synthetic bank, base world (the training data) per quarter: the "
                            "last one is the holdout", quarters, thresholds))
    return repo


def cdnow(out: Path, epochs: int, console: Console) -> None:
    repo = train_and_export("cdnow", [], out / "cdnow", epochs)
    thresholds = Thresholds()
    report = monitor(repo, "cdnow", "cdnow", out / "cdnow" / "report", "M", thresholds)
    table = Table(title=f"CDNOW: PSI per month vs the calibration reference (to {CDNOW_CUTOFF}; "
                  "holdout months marked *)")
    names = [c for c in report.windows.columns if c != "events"]
    table.add_column("month")
    table.add_column("events", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("drifted", justify="right")
    for start, row in report.windows.iterrows():
        holdout = start > pd.Timestamp(CDNOW_CUTOFF)
        values = [row[n] for n in names]
        table.add_row(f"{start:%Y-%m}{' *' if holdout else ''}", f"{int(row['events']):,}",
                      *(f"{v:.3f}" for v in values),
                      str(sum(v >= thresholds.watch for v in values if np.isfinite(v))))
    console.print(table)
    end = pd.Timestamp(CDNOW_CUTOFF) + pd.Timedelta(days=1)
    pooled = {"calibration (to 1997-09-30)": report.period_psi("1997-01-01", end),
              "holdout (1997-10 to 1998-06)": report.period_psi(end, "1998-07-01"),
              "calibration, from 1997-04": report.period_psi("1997-04-01", end)}
    console.print(psi_table("CDNOW: PSI of the calibration and holdout periods pooled vs the "
                            "calibration reference", pooled, thresholds))


def requests(events: pd.DataFrame, size: int) -> list[dict[str, np.ndarray]]:
    """Events in time order as live requests of ``size`` rows."""
    events = events.sort_values("timestamp", kind="stable")
    columns = {
        "customer_id": np.array([c.encode() for c in events["customer_id"]], object),
        "timestamp": np.array([t.isoformat().encode() for t in events["timestamp"]], object),
        "event_type": np.array([t.encode() for t in events["event_type"]], object),
        "amount": events["amount"].to_numpy(np.float32),
    }
    return [{name: value[i:i + size].reshape(-1, 1) for name, value in columns.items()}
            for i in range(0, len(events), size)]


class DriftOnly(ModelMetrics):
    """The drift histograms of ``ModelMetrics`` alone, timed (counters and gauges left out)."""

    def __init__(self, window: SlidingWindow) -> None:
        super().__init__(PrometheusSink(), "bank_live", 1, window)
        self.seconds = 0.0

    def events(self, outcomes) -> None:
        started = time.perf_counter()
        list(outcomes)
        self.seconds += time.perf_counter() - started

    def observe_drift(self, values, now=None) -> None:
        started = time.perf_counter()
        self.drift.add(values)
        self.seconds += time.perf_counter() - started

    def requests(self, outcomes) -> None:
        list(outcomes)

    rejected = requests


def cost(repo: Path, console: Console) -> None:
    version, metadata = version_metadata(repo, "bank_live")
    reference = Reference.from_json(metadata[REFERENCE_KEY])
    events = simulate(world(seed=3))
    events = events[events["timestamp"] > pd.Timestamp(SYNTHETIC_CUTOFF)].head(COST_EVENTS)
    table = Table(title=f"Drift histograms on the live path, in process ({COST_EVENTS:,} "
                  "synthetic events in time order, SQLite states, 1 onnxruntime thread)")
    for column in ("events per request", "live step, us/event", "step graph alone, us/event",
                   "values picked, us/event", "binned into the window, us/event",
                   "drift / live step", "drift / graph", "PSI refresh (1/s), ms"):
        table.add_column(column, justify="right")
    for size in (1, 64):
        batches = requests(events, size)
        with tempfile.TemporaryDirectory() as scratch:
            stores = [open_store(f"sqlite:///{scratch}/{k}.db") for k in range(2)]
            plain = LiveModel(open_live_twins(repo, "bank_live", stores[0], version))
            drift = DriftOnly(SlidingWindow(reference))
            watched = LiveModel(open_live_twins(repo, "bank_live", stores[1], version), drift)
            step_s = 0.0
            for batch in batches:
                started = time.perf_counter()
                plain.answer([batch])
                step_s += time.perf_counter() - started
                watched.answer([batch])  # interleaved: both see the same events and load
            values_us = time_values(plain.twins.spec, plain.twins.graph.outputs, batches)
            graph_us = time_graph(plain.twins, batches)
            refresh = time_refresh(drift.drift)
            for store in stores:
                store.close()
        step_us, binned_us = step_s * 1e6 / len(events), drift.seconds * 1e6 / len(events)
        drift_us = values_us + binned_us
        table.add_row(str(size), f"{step_us:.1f}", f"{graph_us:.1f}", f"{values_us:.2f}",
                      f"{binned_us:.2f}", f"{drift_us / step_us:.1%}", f"{drift_us / graph_us:.1%}",
                      f"{refresh * 1e3:.2f}")
    console.print(table)


def time_values(spec, outputs, batches: list[dict[str, np.ndarray]]) -> float:
    """Microseconds per event to pick the watched values of a batch's applied events out of
    its features and answers (``applied_values``)."""
    total, events = 0.0, 0
    for request in batches:
        batch = read_events({k: v.reshape(-1) for k, v in request.items()}, spec)
        n = len(batch)
        answers = {name: np.zeros((n, 1), np.float32) for name in outputs}
        status = np.full(n, "applied", dtype=object)
        started = time.perf_counter()
        applied_values(batch.features, status, np.ones(n, np.int64), np.ones(n), answers)
        total += time.perf_counter() - started
        events += n
    return total / events * 1e6


def time_graph(twins, batches: list[dict[str, np.ndarray]]) -> float:
    """Microseconds per event of the step graph alone (onnxruntime, from zero states)."""
    total, events = 0.0, 0
    for request in batches:
        batch = read_events({k: v.reshape(-1) for k, v in request.items()}, twins.spec)
        states = {spec.name: np.zeros((len(batch), *spec.shape), spec.dtype)
                  for spec in twins.layout.fields}
        features = {name: batch.features[name] for name in (*twins.graph.event_inputs, "delta_t")}
        started = time.perf_counter()
        twins.run(features, states)
        total += time.perf_counter() - started
        events += len(batch)
    return total / events * 1e6


def time_refresh(window: SlidingWindow, repeats: int = 50) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        window.drifted(window.psi())
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "drift")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to run (cost needs the synthetic twin)")
    args = parser.parse_args()
    console = Console(width=200)
    console.print(f"{time.strftime('%Y-%m-%d %H:%M')} | {machine()} | load average "
                  f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if {"synthetic", "cost"} & set(args.parts):
        repo = synthetic(args.out, args.epochs, console)
        if "cost" in args.parts:
            cost(repo, console)
    if "cdnow" in args.parts:
        cdnow(args.out, args.epochs, console)


if __name__ == "__main__":
    main()
