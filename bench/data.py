"""Data-layer throughput: simulating events and building sequences, with peak memory.

python bench/data.py [--sizes 1000000 10000000 100000000] [--repeats 2]

Each size runs in a fresh subprocess. Tables up to ``--simulate-max`` events are simulated
(``fintwin.data.simulator``, about 52 events per customer); a larger table is that many
events simulated and replicated with new customer ids (the simulator would take minutes and
far more memory than the table), so its customers come in identical copies.

``build_sequences`` runs on two forms of the same table: ``strings`` (customer_id and
event_type as Python strings, as ``validate_events`` returns them) and ``compact``
(pandas categoricals for customer_id and event_type, float32 amounts), with ``--repeats``
timed runs each (the best is shown; the first run on a fresh machine also pays for memory
the OS has not handed out before). Stages: ``encode`` is ``FeaturiserSpec.encode`` on its
own (run once more, untimed in the total), ``rest`` the total minus it (calibration ranges,
features, targets, writing the result). CPU s is the process's user + system time of the
build: on a shared machine, events/s by CPU time is what an idle machine would approach.

Memory is the tracemalloc peak of one more build: everything numpy, pandas (its hash tables
included) and the interpreter allocate while building, the result's arrays among them; the
input table, allocated before, is not counted. (Peak RSS is no measure here: glibc keeps
freed arrays below its dynamic mmap threshold for reuse, so a build after the simulator or
after another build grows RSS by less than it allocates.) It is compared with the ``compact
event table``, ``COMPACT_BYTES`` per event (int32 customer code, int64 ns timestamp, int16
type code, float32 amount), and with the result's own arrays (``output``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from fintwin.data.features import FeaturiserSpec, Vocab, run_starts
from fintwin.data.sequences import SequenceSet, build_sequences
from fintwin.data.simulator import SimulatorConfig, simulate

EVENTS_PER_CUSTOMER = 52  # the default simulated world's average
COMPACT_BYTES = 4 + 8 + 2 + 4  # int32 customer, int64 ns, int16 type, float32 amount
CUTOFF = "2023-09-30"  # the simulated world ends 2023-12-31: later events are holdout
MiB = 2**20


def replicated(events: pd.DataFrame, copies: int) -> pd.DataFrame:
    """``copies`` copies of ``events`` (sorted by customer then time), each with its own
    customer ids (``r<copy>:<id>``), still sorted."""
    first = run_starts(events["customer_id"])
    code = np.cumsum(first) - 1
    ids = events["customer_id"].to_numpy()[first]
    width = len(str(copies - 1))
    return pd.DataFrame(
        {
            "customer_id": np.concatenate(
                [
                    np.array([f"r{c:0{width}d}:{i}" for i in ids], dtype=object)[code]
                    for c in range(copies)
                ]
            ),
            **{name: np.tile(events[name].to_numpy(), copies) for name in events.columns[1:]},
        }
    )


def event_table(n_events: int, simulate_max: int) -> tuple[pd.DataFrame, str, float]:
    """About ``n_events`` events, how they were made, and simulated events per second."""
    simulated = min(n_events, simulate_max)
    started = time.perf_counter()
    events = simulate(SimulatorConfig(n_customers=max(1, simulated // EVENTS_PER_CUSTOMER), seed=1))
    rate = len(events) / (time.perf_counter() - started)
    if n_events <= simulate_max:
        return events, "simulated", rate
    copies = math.ceil(n_events / len(events))
    return replicated(events, copies), f"{len(events):,} simulated x {copies}", rate


def compact(events: pd.DataFrame) -> pd.DataFrame:
    """The same table with categorical customer ids and types and float32 amounts."""
    return events.assign(
        customer_id=pd.Categorical(events["customer_id"]),
        event_type=pd.Categorical(events["event_type"]),
        amount=events["amount"].to_numpy(np.float32),
    )


def output_bytes(sequences: SequenceSet) -> int:
    arrays = [*sequences.features.values(), *sequences.targets.values()]
    return sum(a.nbytes for a in arrays) + sequences.starts.nbytes + sequences.lengths.nbytes


def measure_build(events: pd.DataFrame, spec: FeaturiserSpec, repeats: int) -> dict[str, float]:
    """Best wall and CPU time of ``repeats`` builds, the encode stage, and the peak memory of
    one more build, traced."""
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        sequences = build_sequences(events, spec, cutoff=CUTOFF)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        kept, output = sequences.n_events, output_bytes(sequences)
        del sequences
    started = time.perf_counter()
    spec.encode(events)
    encode_s = time.perf_counter() - started
    gc.collect()
    tracemalloc.start()
    build_sequences(events, spec, cutoff=CUTOFF)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "build_s": min(walls),
        "cpu_s": min(cpus),
        "encode_s": encode_s,
        "kept": kept,
        "peak_mib": peak / MiB,
        "output_mib": output / MiB,
    }


def measure(n_events: int, repeats: int, simulate_max: int) -> dict:
    """One size: the table, then each form of it built ``repeats`` times."""
    load = os.getloadavg()[0]
    events, made, simulate_eps = event_table(n_events, simulate_max)
    spec = FeaturiserSpec(
        Vocab.fit(events["event_type"].iloc[:100_000]), max_len=256, horizon_days=30
    )
    result = {
        "events": len(events),
        "made": made,
        "simulate_eps": simulate_eps,
        "load_start": load,
    }
    result["strings"] = measure_build(events, spec, repeats)
    events = compact(events)  # the strings table is freed
    result["compact"] = measure_build(events, spec, repeats)
    result["load_end"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000]
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--simulate-max",
        type=int,
        default=10_000_000,
        help="largest table simulated; larger ones replicate one this size",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a subprocess's size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats, args.simulate_max)))
        return
    table = Table(
        title=f"fintwin data layer: build_sequences (max_len 256, cutoff {CUTOFF})",
        caption=f"compact table = {COMPACT_BYTES} B/event; peak = tracemalloc peak of "
        "the build, result included; load = 1-minute load average at start/end, 2 cores",
    )
    for column in (
        "events",
        "table",
        "simulate ev/s",
        "input",
        "kept",
        "build s",
        "CPU s",
        "encode s",
        "rest s",
        "ev/s",
        "ev/s CPU",
        "compact MiB",
        "output MiB",
        "peak MiB",
        "peak / compact",
        "load",
    ):
        table.add_column(column, justify="right")
    for size in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            "--repeats",
            str(args.repeats),
            "--simulate-max",
            str(args.simulate_max),
        ]
        r = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        compact_mib = r["events"] * COMPACT_BYTES / MiB
        for form in ("strings", "compact"):
            m = r[form]
            table.add_row(
                f"{r['events']:,}",
                r["made"],
                f"{r['simulate_eps'] / 1e6:.1f}M",
                form,
                f"{m['kept']:,}",
                f"{m['build_s']:.2f}",
                f"{m['cpu_s']:.2f}",
                f"{m['encode_s']:.2f}",
                f"{m['build_s'] - m['encode_s']:.2f}",
                f"{r['events'] / m['build_s'] / 1e6:.1f}M",
                f"{r['events'] / m['cpu_s'] / 1e6:.1f}M",
                f"{compact_mib:,.0f}",
                f"{m['output_mib']:,.0f}",
                f"{m['peak_mib']:,.0f}",
                f"{m['peak_mib'] / compact_mib:.2f}x",
                f"{r['load_start']:.1f}/{r['load_end']:.1f}",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
