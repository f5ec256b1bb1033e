"""Rollout throughput: customers x samples x steps per second, LSTM and transformer twins.

Each encoder as configured in ``configs/model`` (hidden 128; LSTM 1 layer, transformer 2
layers of 4 heads), randomly initialised with CDNOW's vocabulary and scaling, rolls the
first ``--customers`` CDNOW customers (``--transformer-customers`` for the transformer;
same-day merged, ``cds`` as numeric feature, at most 64 events) forward ``--samples`` times
from the 1997-09-30 cut-off over the 39-week holdout. Two heads settings per encoder:
``random`` (as initialised: dormancy about 0.5 per event) and ``busy`` (dormancy fixed at 2%
per event, so a path that survives its first step keeps going). In both, customers silent
for months are mostly dormant at the cut-off already (the first step conditions on the
silence). "path-steps/s" counts encoder steps (one event fed to one path).

The second table times one step against the cache of a history of L events
(``encoder.step``) and re-encoding the L + 1 events from scratch (``forward``), for a batch
of ``--step-batch`` paths: the cached step stays nearly flat in L, re-encoding grows with it.

Run:  python bench/rollout.py [--customers 10000] [--transformer-customers 2000]
                              [--samples 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from rich import box
from rich.console import Console
from rich.table import Table

from fintwin.data.features import FeaturiserSpec, Scaling, Vocab
from fintwin.data.sources import CDNOW_SCHEMA, load_events
from fintwin.models.module import TwinModule
from fintwin.twin.rollout import RolloutConfig, rollout

REPO = Path(__file__).resolve().parents[1]
CUTOFF, HOLDOUT_END = "1997-09-30", "1998-06-30"
MAX_LEN = 64
BUSY_DORMANCY_LOGIT = -3.9  # sigmoid = 2%
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_config(name: str) -> dict:
    """The encoder and head settings of ``configs/model/<name>.yaml``."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"))
    return {"encoder": cfg["encoder"], "n_components": cfg["n_components"]}


def build_model(name: str, vocab: Vocab, scaling: dict, busy: bool) -> TwinModule:
    """A randomly initialised twin (seeded), optionally with the dormancy head fixed at 2%."""
    torch.manual_seed(0)
    model = TwinModule(
        **model_config(name), vocab_size=vocab.size, scaling=scaling, horizon_days=91.0, n_numeric=1
    )
    model.to(DEVICE).eval()
    if busy:
        with torch.no_grad():
            model.time_head.linear.weight[-1].zero_()
            model.time_head.linear.bias[-1] = BUSY_DORMANCY_LOGIT
    return model


def cdnow_histories(customers: int):
    """Histories of the first ``customers`` CDNOW customers up to the cut-off, and the vocab."""
    events, _ = load_events("cdnow", CDNOW_SCHEMA, same_day_merge=True)
    keep = events["customer_id"].drop_duplicates().iloc[:customers]
    events = events[events["customer_id"].isin(keep)]
    vocab = Vocab.fit(events["event_type"])
    spec = FeaturiserSpec(vocab, horizon_days=91.0, max_len=MAX_LEN, numeric_features=("cds",))
    sequences = spec.sequences(events, CUTOFF)
    return sequences, vocab, Scaling.fit(sequences.features).to_dict()


THROUGHPUT_COLUMNS = (
    "encoder",
    "heads",
    "customers",
    "paths",
    "path-steps",
    "max steps",
    "capped",
    "seconds",
    "path-steps/s",
    "paths/s",
    "events/path",
)


def measure(name: str, busy: bool, customers: int, samples: int) -> tuple[str, ...]:
    """One row of the throughput table: a timed rollout of ``customers`` x ``samples`` paths."""
    sequences, vocab, scaling = cdnow_histories(customers)
    model = build_model(name, vocab, scaling, busy)
    config = RolloutConfig(samples=samples, seed=0, dates_only=True)
    started = time.perf_counter()
    result = rollout(model, sequences, vocab, HOLDOUT_END, config)
    seconds = time.perf_counter() - started
    return (
        name,
        "busy" if busy else "random",
        f"{len(sequences):,}",
        f"{result.n_paths:,}",
        f"{result.encoder_steps:,}",
        str(result.max_steps_run),
        str(result.n_capped),
        f"{seconds:.1f}",
        f"{result.encoder_steps / seconds:,.0f}",
        f"{result.n_paths / seconds:,.0f}",
        f"{result.summary['expected_count'].mean():.2f}",
    )


def throughput_table(args: argparse.Namespace, console: Console) -> Table:
    """Rollout throughput of both encoders, heads random and busy (rows printed as they come)."""
    table = Table(
        title=f"Rollouts of CDNOW customers x {args.samples} samples, {CUTOFF} to {HOLDOUT_END} "
        "(39 weeks)",
        box=box.SIMPLE,
    )
    for column in THROUGHPUT_COLUMNS:
        table.add_column(column, justify="right")
    sizes = {"lstm": args.customers, "transformer": args.transformer_customers}
    for name, busy in itertools.product(("lstm", "transformer"), (False, True)):
        row = measure(name, busy, sizes[name], args.samples)
        console.print("  ".join(f"{k}={v}" for k, v in zip(THROUGHPUT_COLUMNS, row, strict=True)))
        table.add_row(*row)
    return table


def _median_ms(fn, inputs: tuple, repeats: int) -> float:
    """Median wall time of ``fn(*inputs)`` in milliseconds, after one warm-up call."""
    fn(*inputs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*inputs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _history(batch: int, length: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    shape = (batch, length)
    history = {
        "event_type": torch.full(shape, 2),
        "amount": torch.from_numpy(rng.lognormal(3, 1, shape).astype(np.float32)),
        "delta_t": torch.from_numpy(rng.exponential(10, shape).astype(np.float32)),
        "day_of_week": torch.zeros(shape, dtype=torch.int64),
        "day_of_month": torch.ones(shape, dtype=torch.int64),
        "hour": torch.zeros(shape, dtype=torch.int64),
        "numeric": torch.ones((*shape, 1)),
        "length": torch.full((batch,), length),
    }
    return {key: value.to(DEVICE) for key, value in history.items()}


@torch.inference_mode()
def step_table(args: argparse.Namespace) -> Table:
    vocab = Vocab(("purchase",))
    scaling = {
        "amount_mean": 3.0,
        "amount_std": 1.0,
        "delta_t_mean": 2.0,
        "delta_t_std": 1.0,
        "numeric_mean": [1.0],
        "numeric_std": [1.0],
    }
    table = Table(
        title=f"One step for {args.step_batch} paths after a history of L events (ms, median)",
        box=box.SIMPLE,
    )
    for column in ("encoder", "L", "cached step", "re-encode L+1", "re-encode / step"):
        table.add_column(column, justify="right")
    for name in ("transformer", "lstm"):
        model = build_model(name, vocab, scaling, busy=False)
        for length in (16, 64, 256, 1024):
            history = _history(args.step_batch, length)
            extended = _history(args.step_batch, length + 1)
            state = model.encoder.prefix_state(history)
            event = {k: v[:, -1] for k, v in extended.items() if k != "length"}
            step = _median_ms(model.encoder.step, (event, state), args.repeats)
            full = _median_ms(model.encoder, (extended,), args.repeats)
            table.add_row(name, str(length), f"{step:.2f}", f"{full:.2f}", f"{full / step:.1f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000, help="LSTM rows")
    parser.add_argument("--transformer-customers", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--step-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    console.print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
        f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}"
    )
    console.print(throughput_table(args, console))
    console.print(step_table(args))


if __name__ == "__main__":
    main()
