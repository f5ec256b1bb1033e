"""Training throughput of the twins: encoders x max length x bucketing, Lightning vs bare loop.

Each encoder as configured in ``configs/model`` (hidden 128; LSTM 1 layer, transformer 2)
is trained with batch 64 on customers from fintwin's simulator, at two maximum sequence
lengths, with and without length bucketing. Every cell is trained twice on the same batches:
by a Lightning ``Trainer`` (``train/loss`` logged every step, loss terms and metrics every
50th) and by a bare PyTorch loop that minimises the module's own ``loss`` (same losses, no
logging or metrics), AdamW with the module's parameter groups
and schedule, and gradient clipping at norm 1 times the batch's share of events
(``TwinModule.batch_share``, as the module clips under Lightning). "Lightning / bare" is the
ratio of their step times (median of the per-repetition ratios; runs of a pair are adjacent
in time). The peer table marks the batching the shipped data configs use as "shipped".

Throughput counts real (non-padding) events per second; the first ``--warmup`` steps are not
timed; each number is the median of ``--repeats`` repetitions, all cells interleaved in
every repetition. As every repetition sees the same batches, the "fastest steps" columns
also give the rate from each step's shortest time over the repetitions, which is far less
sensitive to other processes on a shared machine. fp32, ``torch.set_num_threads(2)``, data
loading in the timed loop (``num_workers=0``), no logger, checkpointing or progress bar.

``--peers PYTHON`` also writes the same events to Parquet and runs the peer yardstick
(``shared/bench/peer_throughput.py``: HoTPP RMTPP and pytorch-lifestream GRU) on that file in
every repetition, with the same steps; see ``bench/peers.md`` for the peer virtualenv. On a
CUDA machine fp32 is compared with bf16-mixed at batch 64 and 512, with the model FLOP
utilisation (``--gpu-only``: that table alone).

Customers with a single event are left out of the data: the pytorch-lifestream task holds
out each customer's last event as its target, so this way every model trains on the same
customers.

Run:  python bench/train.py [--customers 20000] [--steps 50] [--repeats 3] [--quick]
                            [--peers /path/to/peer-venv/bin/python] [--gpu-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from machine_info import machine as cpu_and_lock
from omegaconf import OmegaConf
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from rich import box
from rich.console import Console
from rich.table import Table

from fintwin.data.datamodule import CustomerSplit, EventDataModule
from fintwin.data.simulator import SimulatorConfig, simulate
from fintwin.models.module import TwinModule, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
YARDSTICK = REPO.parent / "shared" / "bench" / "peer_throughput.py"
THREADS = 2
BATCH_SIZE = 64
HIDDEN_SIZE = 128
NUM_LAYERS = {"lstm": 1, "transformer": 2}
MAX_LENS = (64, 200)
PEER_MAX_LEN = 200  # the yardstick's max length
HORIZON_DAYS = 30.0  # as configs/data/synthetic.yaml
GRADIENT_CLIP = 1.0
GPU_BATCH_SIZES = (64, 512)  # the CPU benchmark's batch, and one that keeps a GPU busier
MAX_OVERHEAD = 1.10  # Lightning / bare step time
SEED = 0
# Dense peak FLOP/s (bf16 tensor cores, fp32 without TF32), matched on the device name.
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


@dataclass(frozen=True)
class Throughput:
    events_per_s: float
    padding: float
    ms_per_step: float
    events: int
    step_seconds: tuple[float, ...]


@dataclass
class StepClock:
    """Wall time at the end of every training step and each batch's real / padded events."""

    synchronize: bool = False
    ends: list[float] = field(default_factory=list)
    real: list[int] = field(default_factory=list)
    padded: list[int] = field(default_factory=list)

    def tick(self, batch: dict[str, torch.Tensor]) -> None:
        if self.synchronize:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.real.append(int(batch["length"].sum()))
        self.padded.append(batch["event_type"].numel())

    def throughput(self, warmup: int) -> Throughput:
        """Rates over the steps after ``warmup`` (timed from the end of the last warm-up step)."""
        ends = self.ends[warmup - 1 :]
        step_seconds = tuple(b - a for a, b in zip(ends[:-1], ends[1:], strict=True))
        seconds = sum(step_seconds)
        real, padded = sum(self.real[warmup:]), sum(self.padded[warmup:])
        return Throughput(
            real / seconds,
            1.0 - real / padded,
            1000.0 * seconds / len(step_seconds),
            real,
            step_seconds,
        )


def fastest_steps(runs: list[Throughput]) -> float:
    """Real events/s when every step takes its shortest time over the repetitions.

    The repetitions train on the same batches, so the per-step minimum leaves out most of
    the time lost to other processes on a shared machine.
    """
    seconds = sum(map(min, zip(*(run.step_seconds for run in runs), strict=True)))
    return runs[0].events / seconds


class ClockCallback(pl.Callback):
    """Lightning hook feeding a ``StepClock``."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick(batch)


@dataclass(frozen=True)
class Cell:
    encoder: str
    max_len: int
    bucketed: bool


CELLS = [Cell(e, n, b) for e in NUM_LAYERS for n in MAX_LENS for b in (True, False)]


def simulated_events(customers: int) -> pd.DataFrame:
    """Simulated event table of the customers with two events or more."""
    events = simulate(SimulatorConfig(n_customers=customers, seed=SEED))
    sizes = events.groupby("customer_id")["customer_id"].transform("size")
    return events[sizes > 1].reset_index(drop=True)


def datamodule(
    events: pd.DataFrame, max_len: int, bucketed: bool, batch_size: int = BATCH_SIZE
) -> EventDataModule:
    """Every customer in training, every event in the calibration period."""
    data = EventDataModule(
        source="simulator",
        cutoff=str(events["timestamp"].max().date()),
        horizon_days=HORIZON_DAYS,
        max_len=max_len,
        split=CustomerSplit(val=0.0, test=0.0, seed=SEED),
        batch_size=batch_size,
        bucket_by_length=bucketed,
        seed=SEED,
        events=events,
    )
    data.setup("fit")
    return data


def twin(encoder: str, data: EventDataModule) -> TwinModule:
    """The shipped model config with the benchmark's width and depth, seeded."""
    config = OmegaConf.load(REPO / "configs" / "model" / f"{encoder}.yaml")
    config.encoder.hidden_size = HIDDEN_SIZE
    config.encoder.num_layers = NUM_LAYERS[encoder]
    pl.seed_everything(SEED, verbose=False)
    return instantiate(
        config,
        vocab_size=data.spec.vocab.size,
        scaling=data.model_scaling,
        horizon_days=data.spec.horizon_days,
        n_numeric=data.spec.n_numeric,
    )


def train_lightning(
    model: TwinModule, data: EventDataModule, steps: int, device: str, precision: str
) -> StepClock:
    clock = StepClock(synchronize=device == "cuda")
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=GRADIENT_CLIP,
        log_every_n_steps=50,  # as configs/trainer/default.yaml
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ClockCallback(clock)],
    )
    trainer.fit(model, datamodule=data)
    return clock


def train_bare(
    model: TwinModule, data: EventDataModule, steps: int, device: str, precision: str
) -> StepClock:
    """What the Trainer does per step, written out: the same optimizer, schedule and clipping."""
    hp = model.hparams
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=hp.lr,
    )
    schedule = partial(warmup_cosine, warmup_steps=max(1, hp.warmup_steps), total_steps=steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.to(device).train()
    clock = StepClock(synchronize=device == "cuda")
    for batch in itertools.islice(data.train_dataloader(), steps):
        batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIP * model.batch_share(batch))
        optimizer.step()
        scheduler.step()
        clock.tick(batch)
    return clock


LOOPS = {"lightning": train_lightning, "bare": train_bare}


def run_peers(python: str, events_path: Path, steps: int, warmup: int) -> dict[str, dict]:
    """One run of the peer yardstick on ``events_path``: its result row per library."""
    with tempfile.TemporaryDirectory(prefix="fintwin_peers_") as workdir:
        out = Path(workdir) / "peers.json"
        command = [
            python,
            str(YARDSTICK),
            "--events",
            str(events_path),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--threads",
            str(THREADS),
            "--workdir",
            workdir,
            "--out",
            str(out),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return {row["library"]: row for row in json.loads(out.read_text())["results"]}


def model_flops_per_event(model: TwinModule, data: EventDataModule) -> float:
    """Training FLOPs per real event: 6 x weight-matrix parameters, plus causal attention.

    The usual estimate (forward 2, backward 4 FLOPs per weight and event; attention adds
    12 x layers x hidden x sequence length). Embedding tables are lookups and not counted.
    """
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in tables)
    encoder = model.hparams.encoder
    attention = 0.0
    if encoder["name"] == "transformer":
        mean_length = float(data.sequences.lengths.mean())
        attention = 12.0 * encoder["num_layers"] * encoder["hidden_size"] * mean_length
    return 6.0 * weights + attention


def peak_flops(precision: str) -> float | None:
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks["bf16" if precision == "bf16-mixed" else "fp32"]
    return None


def require_one_epoch(datas: Iterable[EventDataModule], args: argparse.Namespace) -> None:
    """Every timed run must fit in one epoch of each data module (the runs see the same batches)."""
    steps = args.warmup + args.steps
    shortest = min(len(data.train_dataloader()) for data in datas)
    if steps > shortest:
        raise SystemExit(
            f"--warmup + --steps = {steps} exceeds one epoch ({shortest} batches): "
            "raise --customers or lower --steps"
        )


def gpu_table(events: pd.DataFrame, args: argparse.Namespace) -> Table:
    """fp32 vs bf16-mixed Lightning throughput and model FLOP utilisation, bucketed, max 200."""
    table = Table(
        title=f"GPU: {torch.cuda.get_device_name()}, Lightning, bucketed, max length 200 (median)",
        box=box.MARKDOWN,
    )
    columns = ("encoder", "batch", "precision", "real events/s", "ms/step", "TFLOP/s", "MFU")
    for column in columns:
        table.add_column(column, justify="left" if column in ("encoder", "precision") else "right")
    for batch_size in GPU_BATCH_SIZES:
        data = datamodule(events, 200, bucketed=True, batch_size=batch_size)
        require_one_epoch([data], args)
        for encoder in NUM_LAYERS:
            flops_per_event = model_flops_per_event(twin(encoder, data), data)
            for precision in ("32-true", "bf16-mixed"):
                runs = [
                    train_lightning(
                        twin(encoder, data), data, args.warmup + args.steps, "cuda", precision
                    ).throughput(args.warmup)
                    for _ in range(args.repeats)
                ]
                events_per_s = statistics.median(run.events_per_s for run in runs)
                achieved = flops_per_event * events_per_s
                peak = peak_flops(precision)
                table.add_row(
                    encoder,
                    str(batch_size),
                    precision,
                    f"{events_per_s:,.0f}",
                    f"{statistics.median(run.ms_per_step for run in runs):.1f}",
                    f"{achieved / 1e12:.2f}",
                    f"{achieved / peak:.2%}" if peak else "n/a",
                )
    return table


def spread(values: list[float]) -> str:
    """Range of the repetitions relative to their median."""
    return f"{(max(values) - min(values)) / statistics.median(values):.0%}"


def main_table(results: dict[tuple[Cell, str], list[Throughput]]) -> Table:
    table = Table(
        title="Training throughput in real events/s: median of the repetitions, and from the "
        "fastest time of each step; CPU fp32, batch 64, hidden 128",
        box=box.MARKDOWN,
    )
    columns = (
        "encoder",
        "max len",
        "bucketed",
        "padding",
        "Lightning",
        "bare",
        "Lightning / bare",
        "Lightning, fastest steps",
        "bare, fastest steps",
        "Lightning / bare, fastest steps",
        "spread (Lightning, bare)",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for cell in CELLS:
        lightning, bare = results[(cell, "lightning")], results[(cell, "bare")]
        paired = statistics.median(
            b.events_per_s / li.events_per_s for li, b in zip(lightning, bare, strict=True)
        )
        fastest = fastest_steps(lightning), fastest_steps(bare)
        table.add_row(
            cell.encoder,
            str(cell.max_len),
            "yes" if cell.bucketed else "no",
            f"{lightning[0].padding:.0%}",
            f"{statistics.median(r.events_per_s for r in lightning):,.0f}",
            f"{statistics.median(r.events_per_s for r in bare):,.0f}",
            overhead(paired),
            f"{fastest[0]:,.0f}",
            f"{fastest[1]:,.0f}",
            overhead(fastest[1] / fastest[0]),
            f"{spread([r.events_per_s for r in lightning])}, {spread([r.events_per_s for r in bare])}",
        )
    return table


def overhead(ratio: float) -> str:
    return f"{ratio:.3f}" + ("" if ratio < MAX_OVERHEAD else f" > {MAX_OVERHEAD}")


def shipped_bucketing() -> bool:
    """Whether the shipped data configs bucket by length (``configs/data/*.yaml`` agree)."""
    configs = sorted((REPO / "configs" / "data").glob("*.yaml"))
    values = {bool(OmegaConf.load(path).bucket_by_length) for path in configs}
    if len(values) != 1:
        raise SystemExit(f"configs/data/*.yaml disagree on bucket_by_length: {values}")
    return values.pop()


def peer_table(
    results: dict[tuple[Cell, str], list[Throughput]], peers: list[dict[str, dict]]
) -> Table:
    table = Table(
        title="Side by side on the same file: max length 200, batch 64, hidden 128, 1 layer, "
        "fp32, 2 threads (median)",
        box=box.MARKDOWN,
    )
    for column in ("model", "real events/s", "padding", "ms/step", "vs HoTPP"):
        table.add_column(column, justify="left" if column == "model" else "right")
    hotpp = statistics.median(run["hotpp"]["events_per_s"] for run in peers)
    for bucketed in (True, False):
        runs = results[(Cell("lstm", PEER_MAX_LEN, bucketed), "lightning")]
        events_per_s = statistics.median(run.events_per_s for run in runs)
        batching = "bucketed" if bucketed else "no bucketing"
        shipped = ", shipped" if bucketed == shipped_bucketing() else ""
        table.add_row(
            f"fintwin LSTM twin, all heads ({batching}{shipped})",
            f"{events_per_s:,.0f}",
            f"{runs[0].padding:.0%}",
            f"{statistics.median(run.ms_per_step for run in runs):.0f}",
            f"{events_per_s / hotpp:.2f}x",
        )
    for library, name in (("hotpp", "HoTPP RMTPP GRU"), ("ptls", "pytorch-lifestream GRU")):
        rows = [run[library] for run in peers]
        failed = [row["error"] for row in rows if "error" in row]
        if failed:
            table.add_row(name, f"failed: {failed[0]}", "", "", "")
            continue
        events_per_s = statistics.median(row["events_per_s"] for row in rows)
        table.add_row(
            name,
            f"{events_per_s:,.0f}",
            f"{rows[0]['padding_fraction']:.0%}",
            f"{statistics.median(row['ms_per_step'] for row in rows):.0f}",
            f"{events_per_s / hotpp:.2f}x",
        )
    return table


def machine() -> str:
    cpu = cpu_and_lock()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({cpu}), load average {load}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--customers", type=int, default=20_000, help="simulated customers")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--peers", metavar="PYTHON", help="python of the peer virtualenv")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU table (CUDA)")
    args = parser.parse_args()
    if args.quick:
        args.customers, args.steps, args.warmup, args.repeats = 1000, 4, 2, 1
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    if args.gpu_only and not torch.cuda.is_available():
        parser.error("--gpu-only needs a CUDA device")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(THREADS)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=re.escape("You are trying to `self.log()`"))
    warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)`"))
    console = Console(width=220)
    console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {machine()}")

    events = simulated_events(args.customers)
    if args.gpu_only:
        console.print(gpu_table(events, args))
        return
    datas = {(n, b): datamodule(events, n, b) for n in MAX_LENS for b in (True, False)}
    require_one_epoch(datas.values(), args)
    steps = args.warmup + args.steps
    console.print(
        f"{events['customer_id'].nunique():,} customers, {len(events):,} events; "
        f"{args.steps} timed + {args.warmup} warm-up steps, {args.repeats} repetitions"
    )

    with tempfile.TemporaryDirectory(prefix="fintwin_bench_") as workdir:
        events_path = Path(workdir) / "events.parquet"
        if args.peers:
            events.to_parquet(events_path, index=False)
            console.print(f"peers: {YARDSTICK} --events {events_path}")
        results: dict[tuple[Cell, str], list[Throughput]] = {}
        peers: list[dict[str, dict]] = []
        for repeat in range(args.repeats):
            for cell in CELLS:
                data = datas[(cell.max_len, cell.bucketed)]
                order = ("lightning", "bare") if repeat % 2 == 0 else ("bare", "lightning")
                for loop in order:
                    clock = LOOPS[loop](twin(cell.encoder, data), data, steps, "cpu", "32-true")
                    results.setdefault((cell, loop), []).append(clock.throughput(args.warmup))
            if args.peers:
                peers.append(run_peers(args.peers, events_path, args.steps, args.warmup))
            console.print(f"repetition {repeat + 1}/{args.repeats} done, {machine()}")

    console.print(main_table(results))
    if peers:
        console.print(peer_table(results, peers))
    if torch.cuda.is_available():
        console.print(gpu_table(events, args))


if __name__ == "__main__":
    main()
