"""Where in the holdout do the forecasts' totals go wrong? Error by calendar quarter.

Reads the weekly cumulative repeat transactions (``tracking.csv``) of one or more ``fintwin
report`` directories (e.g. the seeds of ``bench/twin_cdnow.py``, averaged), splits the
holdout weeks by the calendar quarter they end in, and prints per quarter the actual
transactions, each model's forecast and its error. The calibration weeks of the standard
CDNOW split run from January to September 1997: a quarter the models never saw (October to
December) shows how much of the totals' error is the season.

Run:  python bench/cdnow_seasons.py outputs/twin_cdnow/seed0/report [more report dirs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from fintwin.twin.report import TRACKING_FILE


def read_tracking(report_dirs: list[Path]) -> pd.DataFrame:
    """The reports' weekly cumulative curves, averaged (the actual is the same in each)."""
    missing = [str(path) for path in report_dirs if not (path / TRACKING_FILE).is_file()]
    if missing:
        raise SystemExit(f"no {TRACKING_FILE} in {', '.join(missing)}: run fintwin report there")
    frames = [
        pd.read_csv(path / TRACKING_FILE, index_col="week_end", parse_dates=True)
        for path in report_dirs
    ]
    return sum(frames) / len(frames)


def quarter_increments(tracking: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Transactions per holdout quarter (rows) for the actual and each model (columns).

    The models' curves continue the actual cumulative count from the cut-off week (where
    ``tracking.csv`` leaves them empty), so each increment is a forecast from the cut-off.
    """
    holdout = tracking.loc[tracking.index >= cutoff].copy()
    holdout.iloc[0] = holdout.iloc[0].fillna(holdout["actual"].iloc[0])
    weekly = holdout.diff().iloc[1:]
    quarters = weekly.index.to_period("Q")
    table = weekly.groupby(quarters).sum()
    table.insert(0, "weeks", weekly.groupby(quarters).size())
    table.loc["holdout"] = table.sum()
    return table


def quarter_table(increments: pd.DataFrame) -> Table:
    models = [c for c in increments.columns if c not in ("weeks", "actual")]
    table = Table(
        title="holdout repeat transactions by calendar quarter (forecast from the cut-off)"
    )
    for column in ("quarter", "weeks", "actual", *models, *(f"{m} error" for m in models)):
        table.add_column(column, justify="right")
    for quarter, row in increments.iterrows():
        errors = [f"{100 * (row[m] / row['actual'] - 1):+.1f}%" for m in models]
        table.add_row(
            str(quarter), f"{row['weeks']:.0f}", f"{row['actual']:,.0f}",
            *(f"{row[m]:,.0f}" for m in models), *errors,
        )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("reports", type=Path, nargs="+", help="fintwin report directories")
    parser.add_argument("--cutoff", default="1997-09-30", help="last calibration day")
    args = parser.parse_args()
    tracking = read_tracking(args.reports)
    increments = quarter_increments(tracking, pd.Timestamp(args.cutoff))
    Console(width=160).print(quarter_table(increments))


if __name__ == "__main__":
    main()
