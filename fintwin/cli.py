"""`fintwin <command>`: data summary, export, serve, predict, simulate, report.

Every command exits 0 on success, 2 on bad input (message on stderr, no traceback) and 1 on
an internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from fintwin.errors import FintwinInputError

log = logging.getLogger("fintwin")


def _data_summary(args: argparse.Namespace) -> int:
    from fintwin.data.schema import EventSchema
    from fintwin.data.sources import CDNOW_FILES, CDNOW_SCHEMA, load_events

    schema = CDNOW_SCHEMA if args.source in CDNOW_FILES else EventSchema(
        numeric_features=args.numeric or [], categorical_features=args.categorical or [])
    events, report = load_events(args.source, schema, same_day_merge=args.merge_same_day)
    console = Console()
    table = Table(title=f"{args.source}: event data summary", show_header=False)
    table.add_row("customers", f"{events['customer_id'].nunique():,}")
    table.add_row("events", f"{len(events):,}" + (" (same-day merged)" if args.merge_same_day else ""))
    table.add_row("date range", f"{events['timestamp'].min()} to {events['timestamp'].max()}")
    table.add_row("exact duplicate rows", f"{report.duplicates:,}"
                  + (" (dropped)" if report.duplicates_dropped else " (kept)"))
    table.add_row("input was sorted", str(report.was_sorted))
    per_customer = events.groupby("customer_id", sort=False).size()
    table.add_row("events per customer (median / max)", f"{per_customer.median():g} / {per_customer.max():,}")
    quantiles = events["amount"].quantile([0.0, 0.25, 0.5, 0.75, 0.99, 1.0])
    table.add_row("amount quantiles (0/25/50/75/99/100%)", " / ".join(f"{q:,.2f}" for q in quantiles))
    mix = events["event_type"].value_counts(normalize=True)
    table.add_row("event types", ", ".join(f"{t} {p:.1%}" for t, p in mix.items()))
    console.print(table)
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect event data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    summary = data_sub.add_parser(
        "summary", help="validate a source and summarise it",
        description="Validate an event source against the event contract and print a summary.",
        epilog="example: fintwin data summary cdnow\n         fintwin data summary events.parquet "
               "--numeric balance", formatter_class=argparse.RawDescriptionHelpFormatter)
    summary.add_argument("source", help="cdnow | cdnow_sample | synthetic | file.csv | file.parquet | directory")
    summary.add_argument("--numeric", nargs="*", help="declared numeric feature columns")
    summary.add_argument("--categorical", nargs="*", help="declared categorical feature columns")
    summary.add_argument("--merge-same-day", action="store_true",
                         help="merge a customer's same-type events of the same day")
    summary.set_defaults(handler=_data_summary)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(prog="fintwin", description="Customer digital twins.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fintwin` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except FintwinInputError as err:
        print(f"fintwin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # internal error: keep the traceback for the log, exit 1
        log.exception("internal error: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
