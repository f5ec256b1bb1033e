"""`fintwin explain`: reason codes for customers' predictions, as tables, JSON and HTML."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from fintwin.errors import FintwinInputError

SUMMARY = ("Explain a twin's output for customers: integrated-gradients attributions to their "
           "events and fields (adding up to prediction - reference), grouped into ranked "
           "reasons. --out .parquet (reasons; per-event attributions in STEM.events.parquet) "
           "or .json; --html DIR adds a page per customer.")
EXAMPLE = ("fintwin explain --repo model_repository --model twin --events events.csv "
           "--customers C0042 C0077 --output churn_prob --out reasons.parquet --html reasons/")


def run(args: argparse.Namespace) -> int:
    """The command's handler."""
    from fintwin.explain.explainer import Explainer, write_explanations

    if (args.ckpt is None) == (args.repo is None):
        raise FintwinInputError("give exactly one of --ckpt PATH or --repo DIR (with --model NAME)")
    if args.out.suffix not in (".parquet", ".json"):
        raise FintwinInputError(f"--out {args.out}: expected a .parquet or .json file")
    options = {} if args.steps is None else {"start_steps": args.steps}
    explainer = (Explainer.from_checkpoint(args.ckpt, **options) if args.ckpt is not None
                 else Explainer.from_repository(args.repo, args.model, args.version, **options))
    explanations = explainer.explain(args.events, args.output, args.customers, args.top,
                                     args.as_of)
    write_explanations(explanations, args.out, args.html)
    worst = max((abs(e.convergence_delta) for e in explanations), default=0.0)
    unconverged = sum(not e.converged for e in explanations)
    print(f"{len(explanations):,} customers explained ({explanations[0].output if explanations else args.output}; "
          f"largest convergence delta {worst:.2g}"
          + (f", {unconverged} over the tolerance" if unconverged else "") + f") -> {args.out}")
    return 0


def add_explain(sub: argparse._SubParsersAction,
                command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `fintwin explain` with ``command(sub, name, summary, example, handler)``."""
    parser = command(sub, "explain", SUMMARY, EXAMPLE, run)
    parser.add_argument("--ckpt", type=Path, help="checkpoint written by train.py")
    parser.add_argument("--repo", type=Path, help="exported model repository (its NAME_explain)")
    parser.add_argument("--model", default="fintwin", help="model NAME in --repo")
    parser.add_argument("--version", type=int, help="explanation model version (default: latest)")
    parser.add_argument("--events", required=True, help="CSV / Parquet file or directory of raw events")
    parser.add_argument("--customers", nargs="+", help="customer ids to explain (default: all)")
    parser.add_argument("--output", default="churn_prob",
                        help="churn_prob | horizon_spend | horizon_count | next_time_mean | "
                        "dormant_prob | next_amount_mean | next_event_probs[:TYPE]")
    parser.add_argument("--top", type=int, default=4, help="reasons per customer")
    parser.add_argument("--as-of", help="day the silence is counted to (default: the last day "
                        "in --events)")
    parser.add_argument("--steps", type=int, help="first number of integration steps (default "
                        "8; doubled per customer until complete, up to 512)")
    parser.add_argument("--out", type=Path, required=True, help="output .parquet or .json")
    parser.add_argument("--html", type=Path, help="directory for one HTML page per customer")
