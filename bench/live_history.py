"""Live twins over long histories: what a step costs as a history grows, and how far a live twin
drifts from batch scoring past ``max_len`` on CDNOW's longest customers.

Step cost: the exported step graph of each encoder (random weights, as ``bench/live.py``: hidden
128, LSTM 1 layer, transformer 2 layers and a window of ``max_len`` = 256), run with
onnxruntime (1 thread) from states stepped through 10 and through 1,000 events; ms per step at
batch 1 and batch 64 (median of ``--repeats`` runs).

Divergence: the default CDNOW twin (``python train.py``, the LSTM with ``max_len`` 64, trained
here unless ``--ckpt`` names a checkpoint) steps every event of each customer with more than
64 events from the empty state; after each event past the 64th its outputs are compared with
batch scoring of the last 64 events (``fintwin.live.step.divergence_past_max_len``). Per
output: the median and the largest scaled difference ``|live - batch| / max(1, |batch|)``
over those steps, and the median at each customer's last event.

Run:  python bench/live_history.py [--ckpt PATH] [--repeats 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from live import MAX_LEN, random_twin
from machine_info import machine

from fintwin.data.sources import read_cdnow
from fintwin.live.repository import export_step_graph
from fintwin.live.step import OUTPUT_NAMES, divergence_past_max_len
from fintwin.live.store import StateLayout
from fintwin.live.twins import StepGraph, StepSession
from fintwin.models.checkpoint import load_twin
from fintwin.serving.python_model import load_onnx

HISTORIES = (10, 1000)
BATCHES = (1, 64)


class StepRunner:
    """An encoder's exported step graph with random events and states."""

    def __init__(self, encoder: str, scratch: Path) -> None:
        twin = random_twin(encoder)
        step_graph, _, metadata = export_step_graph(twin, scratch)
        self.twins = StepSession(StepGraph.from_metadata(metadata),
                                 StateLayout.from_json(metadata["layout"]), load_onnx(step_graph, 1))
        self.rng = np.random.default_rng(0)

    def events(self, rows: int) -> dict[str, np.ndarray]:
        graph = self.twins.graph
        feeds = {name: self._random_input(name, rows) for name in graph.event_inputs}
        feeds["delta_t"] = self.rng.exponential(1.0, rows).astype(np.float32)
        return feeds

    def _random_input(self, name: str, rows: int) -> np.ndarray:
        meta = next(i for i in self.twins.session.get_inputs() if i.name == name)
        shape = [rows, *[d if isinstance(d, int) else 1 for d in meta.shape[1:]]]
        if "int64" in meta.type:
            return self.rng.integers(1, 4, shape).astype(np.int64)
        return self.rng.normal(0, 1, shape).astype(np.float32)

    def states_after(self, events: int, rows: int) -> dict[str, np.ndarray]:
        states = {spec.name: np.zeros((rows, *spec.shape), spec.dtype)
                  for spec in self.twins.layout.fields}
        for _ in range(events):
            states = self.twins.run(self.events(rows), states)
        return states

    def ms_per_step(self, history: int, rows: int, repeats: int) -> float:
        states, event = self.states_after(history, rows), self.events(rows)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.twins.run(event, states)
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))


def step_cost_table(repeats: int) -> list[str]:
    lines = ["| encoder | batch | ms/step at history 10 | ms/step at history 1,000 | ratio |",
             "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as scratch:
        for encoder in ("lstm", "transformer"):
            runner = StepRunner(encoder, Path(scratch) / encoder)
            for rows in BATCHES:
                short, long = (runner.ms_per_step(h, rows, repeats) for h in HISTORIES)
                lines.append(f"| {encoder} (window {MAX_LEN}) | {rows} | {short:.3f} | "
                             f"{long:.3f} | {long / short:.2f} |")
    return lines


def trained_cdnow_twin(scratch: Path) -> Path:
    """The default CDNOW twin's best checkpoint, trained with ``python train.py``."""
    run = scratch / "train"
    subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run}"], check=True,
                   cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL)
    return run / json.loads((run / "metrics.json").read_text())["best_checkpoint"]


def divergence_table(ckpt: Path) -> list[str]:
    twin = load_twin(ckpt)
    window = twin.spec.max_len
    events = twin.spec.read_events(read_cdnow())
    whole = dataclasses.replace(twin.spec, max_len=10**6).inference_sequences(events)
    frame = divergence_past_max_len(twin.model, whole, window)
    last = frame.groupby("customer_id").tail(1)
    lengths = frame.groupby("customer_id")["events"].max()
    lines = [
        f"{len(lengths)} customers with more than {window} events (up to {lengths.max()}), "
        f"{len(frame)} live steps past the {window}th event:",
        "",
        "| output | median | max | median at the last event |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {frame[name].median():.4f} | {frame[name].max():.4f} | "
              f"{last[name].median():.4f} |" for name in OUTPUT_NAMES]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a trained CDNOW checkpoint (default: train one)")
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per cell")
    args = parser.parse_args()
    print(f"# {machine()}, {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} UTC\n")
    print("\n".join(step_cost_table(args.repeats)) + "\n")
    with tempfile.TemporaryDirectory() as scratch:
        ckpt = args.ckpt or trained_cdnow_twin(Path(scratch))
        print(f"checkpoint: {ckpt}\n")
        print("\n".join(divergence_table(ckpt)))


if __name__ == "__main__":
    main()
