"""Data-layer throughput: simulating events and building sequences, with peak memory.

python bench/data.py [--sizes 1000000 10000000]

Prints events/s for the simulator and for `build_sequences` (featurise, targets, truncation)
and the peak memory of sequence building relative to the input table's in-memory size.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from rich.console import Console
from rich.table import Table

from fintwin.data.features import FeaturiserSpec, Vocab
from fintwin.data.sequences import build_sequences
from fintwin.data.simulator import SimulatorConfig, simulate

EVENTS_PER_CUSTOMER = 52  # the default simulated world's average


def measure(n_events: int) -> dict[str, float]:
    """Simulate about ``n_events`` events, then build sequences from them."""
    config = SimulatorConfig(n_customers=max(1, n_events // EVENTS_PER_CUSTOMER), seed=1)
    started = time.perf_counter()
    events = simulate(config)
    simulate_s = time.perf_counter() - started
    table_bytes = events.memory_usage(deep=True).sum()
    spec = FeaturiserSpec(Vocab.fit(events["event_type"]), max_len=256, horizon_days=30)

    def build():
        return build_sequences(events, spec, cutoff="2023-09-30")

    started = time.perf_counter()
    sequences = build()
    build_s = time.perf_counter() - started
    tracemalloc.start()  # a second, untimed run: tracing slows allocation down
    build()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"events": len(events), "simulate_eps": len(events) / simulate_s,
            "build_eps": len(events) / build_s, "build_s": build_s, "table_mb": table_bytes / 2**20,
            "peak_mb": peak / 2**20, "customers": len(sequences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = parser.parse_args()
    table = Table(title="fintwin data layer (events/s; peak = extra memory while building)")
    for column in ("events", "customers", "simulate ev/s", "build ev/s", "build s",
                   "table MiB", "peak MiB", "peak / table"):
        table.add_column(column, justify="right")
    for size in args.sizes:
        r = measure(size)
        table.add_row(f"{r['events']:,}", f"{r['customers']:,}", f"{r['simulate_eps']:,.0f}",
                      f"{r['build_eps']:,.0f}", f"{r['build_s']:.2f}", f"{r['table_mb']:,.0f}",
                      f"{r['peak_mb']:,.0f}", f"{r['peak_mb'] / r['table_mb']:.2f}x")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
