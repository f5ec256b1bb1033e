"""Synthetic world: simulator and oracle speed, and the oracle-vs-marginal gap.

Run: python bench/simulator_oracle.py
"""

import dataclasses
import time

import pandas as pd

from fintwin.data.oracle import fit_marginal_baseline, nll_per_event, oracle_log_likelihood
from fintwin.data.simulator import SEGMENTS, SimulatorConfig, customer_segments, simulate


def _timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def _known_segment_nll(events: pd.DataFrame, config: SimulatorConfig) -> dict[str, float]:
    """Oracle that is told each customer's segment (a one-hot prior per segment)."""
    segment = events["customer_id"].map(customer_segments(config))
    parts = []
    for i, name in enumerate(SEGMENTS):
        one_hot = [float(i == j) for j in range(len(SEGMENTS))]
        known = dataclasses.replace(config, segment_prior=one_hot)
        parts.append(oracle_log_likelihood(events[segment == name], known))
    return nll_per_event(pd.concat(parts))


def main() -> None:
    config = SimulatorConfig()
    events, _ = _timed(simulate, config)
    sizes = events.groupby("customer_id").size()
    print(
        f"default world: {len(events):,} events, {len(sizes):,} customers, "
        f"{sizes.mean():.1f} events/customer, {(sizes == 1).mean():.1%} with one event"
    )

    oracle = nll_per_event(oracle_log_likelihood(events, config))
    known = _known_segment_nll(events, config)
    baseline = fit_marginal_baseline(events, config.end).log_likelihood(events, config.end)
    marginal = nll_per_event(baseline)
    print("\nNLL per scored event (nats)")
    print(pd.DataFrame({"known segment": known, "oracle": oracle, "marginal": marginal}).round(3))
    print(f"marginal - oracle: {marginal['total'] - oracle['total']:.3f} nats/event")

    big = dataclasses.replace(config, n_customers=20_000, seed=1)
    events, sim_s = _timed(simulate, big)
    _, oracle_s = _timed(oracle_log_likelihood, events, big)
    _, fit_s = _timed(fit_marginal_baseline, events, big.end)
    print(f"\n{len(events):,} events")
    print(
        pd.DataFrame(
            {
                "seconds": [sim_s, oracle_s, fit_s],
                "events/s": [len(events) / s for s in (sim_s, oracle_s, fit_s)],
            },
            index=["simulate", "oracle_log_likelihood", "fit_marginal_baseline"],
        ).round(2)
    )


if __name__ == "__main__":
    main()
