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
    """Repeat transactions per calendar quarter (rows) for the actual and each model (columns).

    Quarters are those the week ends fall in; calibration quarters hold the actual only. The
    models' curves continue the actual cumulative count from the cut-off week (where
    ``tracking.csv`` leaves them empty), so each holdout increment is a forecast from the
    cut-off. A last row sums the holdout.
    """
    if cutoff not in tracking.index:
        raise SystemExit(f"the cut-off {cutoff.date()} is not a week end of {TRACKING_FILE}")
    curves = tracking.copy()
    row = curves.index.get_loc(cutoff)
    curves.iloc[row] = curves.iloc[row].fillna(curves["actual"].iloc[row])
    weekly = curves.diff()
    weekly.iloc[0] = curves.iloc[0]
    quarters = weekly.index.to_period("Q")
    table = weekly.groupby(quarters).sum(min_count=1)
    table.insert(0, "weeks", weekly.groupby(quarters).size())
    table.index = table.index.astype(str)
    holdout = weekly.loc[weekly.index > cutoff]
    table.loc["holdout"] = [len(holdout), *holdout.sum()]
    return table


def quarter_table(increments: pd.DataFrame) -> Table:
    models = [c for c in increments.columns if c not in ("weeks", "actual")]
    title = "repeat transactions by calendar quarter (models: forecast from the cut-off)"
    table = Table(title=title)
    for column in ("quarter", "weeks", "actual", *models, *(f"{m} error" for m in models)):
        table.add_column(column, justify="right")
    for quarter, row in increments.iterrows():
        forecasts = [row[m] for m in models]
        cells = ["" if pd.isna(v) else f"{v:,.0f}" for v in forecasts]
        errors = ["" if pd.isna(v) else f"{100 * (v / row['actual'] - 1):+.1f}%" for v in forecasts]
        table.add_row(quarter, f"{row['weeks']:.0f}", f"{row['actual']:,.0f}", *cells, *errors)
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
