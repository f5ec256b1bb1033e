"""How many rollout paths the twin's predictive distribution needs, against BG/NBD's exact one.

Rolls every CDNOW customer forward once with ``--samples`` paths (the settings of ``fintwin
report``), then scores the distribution built from the first S paths of each customer for every
S in ``--paths`` (``fintwin.twin.scores``), beside BG/NBD's. The log score of a PMF estimated
from S paths is biased down by its Monte Carlo noise; the table shows how fast that fades, and
which customers carry the gap: those whose actual count had a probability below 1 / S.

Run:  python bench/distribution_paths.py CKPT [--samples 1000] [--paths 100 200 400 800 1000]
                                          [--cutoff 1997-09-30] [--holdout-end 1998-06-30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from machine_info import machine
from rich.console import Console
from rich.table import Table

from fintwin.twin.baselines import BGNBDGammaGamma
from fintwin.twin.evaluation import holdout_actuals
from fintwin.twin.pipeline import load_model, read_events, rollout_config
from fintwin.twin.rollout import rollout
from fintwin.twin.scores import LOG_FLOOR, HoldoutDistribution, pmf_at

COLUMNS = ("txn_log_score", "txn_rps", "txn_pit_ks", "txn_pit_cover80", "spend_pit_cover80")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("ckpt")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--paths", type=int, nargs="+", default=[100, 200, 400, 800, 1000])
    parser.add_argument("--cutoff", default="1997-09-30")
    parser.add_argument("--holdout-end", default="1998-06-30")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    twin = load_model(args.ckpt, "cpu")
    events = read_events(twin, "cdnow")
    actual = holdout_actuals(events, args.cutoff, args.holdout_end)
    clock = time.perf_counter()
    config = rollout_config(events, args.samples, args.seed, 1000, keep_outcomes=True)
    sequences = twin.spec.sequences(events, args.cutoff)
    result = rollout(twin.model, sequences, twin.spec.vocab, args.holdout_end, config)
    seconds = time.perf_counter() - clock
    rows = result.summary.index.get_indexer(actual.index)
    bgnbd = (
        BGNBDGammaGamma().fit(events, args.cutoff).holdout_distribution(args.holdout_end, actual)
    )
    bgnbd_log = np.log(pmf_at(bgnbd.txn_pmf, bgnbd.txn))

    table = Table(title=f"CDNOW cut-off {args.cutoff}: the twin's distribution from S paths")
    for column in ("forecast", *COLUMNS, "p(y) < 1/S", "their log-score gap"):
        table.add_column(column, justify="right")
    for paths in (s for s in args.paths if s <= args.samples):
        distribution = HoldoutDistribution.from_samples(
            result.path_transactions[rows, :paths],
            result.path_spend[rows, :paths],
            actual["txn"].to_numpy(),
            actual["spend"].to_numpy(float),
        )
        scores = distribution.scores()
        log_p = np.log(np.maximum(pmf_at(distribution.txn_pmf, distribution.txn), LOG_FLOOR))
        rare = log_p < -np.log(paths)
        gap = (log_p[rare] - bgnbd_log[rare]).sum() / len(log_p)  # their part of the mean
        cells = [f"{scores[key]:.4f}" for key in COLUMNS]
        table.add_row(f"twin, S = {paths}", *cells, f"{rare.mean():.2%}", f"{gap:+.4f}")
    scores = bgnbd.scores()
    table.add_row("BG/NBD (exact)", *(f"{scores[key]:.4f}" for key in COLUMNS), "", "")
    console = Console(width=160)
    console.print(f"{started}, {machine()}, {args.ckpt}, {args.samples} paths in {seconds:.0f} s")
    console.print(table)


if __name__ == "__main__":
    main()
