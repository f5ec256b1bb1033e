"""Event sources: CSV, Parquet (file or partitioned directory), CDNOW and the simulator.

Every source returns a raw table that ``fintwin.data.schema.validate_events`` turns into
the event contract. Parquet is read through a pyarrow dataset with column projection, so
only the columns the schema needs are read from disk.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads

from fintwin.data.schema import EventSchema, ValidationReport, validate_events
from fintwin.errors import FintwinInputError

BUILT_IN = ("cdnow", "cdnow_sample", "synthetic")
CDNOW_FILES = {"cdnow": "CDNOW_master.txt", "cdnow_sample": "CDNOW_sample.txt"}
CDNOW_SCHEMA = EventSchema(numeric_features=["cds"])


def cdnow_path(name: str = "cdnow") -> Path:
    """Path of a CDNOW file shipped inside the installed ``lifetimes`` wheel."""
    try:
        root = importlib.resources.files("lifetimes") / "datasets"
    except ModuleNotFoundError as err:
        raise FintwinInputError("CDNOW needs the 'lifetimes' package (pip install lifetimes)") from err
    return Path(str(root / CDNOW_FILES[name]))


def read_cdnow(name: str = "cdnow") -> pd.DataFrame:
    """The CDNOW purchase history: one row per purchase, amount in dollars, ``cds`` = CDs bought.

    ``cdnow`` is the full cohort (23,570 customers, 69,659 rows); ``cdnow_sample`` is the
    2,357-customer tenth used in the BG/NBD paper.
    """
    path = cdnow_path(name)
    cols = ["customer_id", "date", "cds", "amount"] if name == "cdnow" else \
        ["customer_id", "sample_id", "date", "cds", "amount"]
    raw = pd.read_csv(path, sep=r"\s+", header=None, names=cols, dtype={"customer_id": str},
                      skiprows=1 if name == "cdnow" else 0)
    return pd.DataFrame({
        "customer_id": raw["customer_id"],
        "timestamp": pd.to_datetime(raw["date"].astype(str), format="%Y%m%d"),
        "event_type": "purchase",
        "amount": raw["amount"].astype("float64"),
        "cds": raw["cds"].astype("float64"),
    })


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """Read the wanted columns of a CSV file; customer ids are kept as strings."""
    header = list(pd.read_csv(path, nrows=0).columns)
    wanted = [c for c in header if c in columns]
    return pd.read_csv(path, usecols=wanted, dtype={"customer_id": str})


def read_parquet(path: Path, columns: list[str], filter_expr: pads.Expression | None = None) -> pd.DataFrame:
    """Read only ``columns`` (and rows matching ``filter_expr``) of a Parquet file or directory."""
    dataset = pads.dataset(path, format="parquet", partitioning="hive")
    wanted = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=wanted, filter=filter_expr).to_pandas()


def merge_same_day(events: pd.DataFrame, numeric_features: list[str]) -> pd.DataFrame:
    """Merge a customer's events of the same type on the same calendar day into one event.

    Amounts and numeric features are summed; the event keeps the day's first timestamp.
    This is the BG/NBD convention for CDNOW (67,591 transactions from 69,659 rows).
    """
    day = events["timestamp"].dt.floor("D")
    keys = [events["customer_id"], day.rename("_day"), events["event_type"]]
    agg = {"timestamp": "min", "amount": "sum", **{c: "sum" for c in numeric_features}}
    extra = [c for c in events.columns if c not in {"customer_id", "event_type", *agg}]
    agg.update({c: "first" for c in extra})
    merged = events.groupby(keys, sort=True, observed=True).agg(agg).reset_index()
    return merged.drop(columns="_day")[list(events.columns)]


def read_source(source: str, schema: EventSchema, simulator_config=None) -> pd.DataFrame:
    """Raw (unvalidated) table for a source name or path."""
    if source in CDNOW_FILES:
        return read_cdnow(source)
    if source == "synthetic":
        from fintwin.data.simulator import SimulatorConfig, simulate

        return simulate(simulator_config or SimulatorConfig())
    path = Path(source)
    if not path.exists():
        raise FintwinInputError(
            f"{source}: no such file or directory; expected one of {list(BUILT_IN)}, "
            "a .csv or .parquet file, or a directory of Parquet files")
    if path.is_dir() or path.suffix == ".parquet":
        return read_parquet(path, schema.columns)
    if path.suffix in (".csv", ".gz", ".txt"):
        return read_csv(path, schema.columns)
    raise FintwinInputError(f"{source}: unsupported file type '{path.suffix}'; expected .csv or .parquet")


def load_events(
    source: str,
    schema: EventSchema | None = None,
    *,
    same_day_merge: bool = False,
    simulator_config=None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Load, validate and (optionally) merge same-day events from any source."""
    schema = schema or (CDNOW_SCHEMA if source in CDNOW_FILES else EventSchema())
    raw = read_source(source, schema, simulator_config)
    events, report = validate_events(raw, schema, source=source)
    if same_day_merge:
        events = merge_same_day(events, schema.numeric_features)
    return events, report
