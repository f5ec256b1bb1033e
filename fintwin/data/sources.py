"""Event sources: CSV, Parquet (file or partitioned directory), CDNOW and the simulator.

Every source returns a raw table that ``fintwin.data.schema.validate_events`` turns into
the event contract. Parquet is read through a pyarrow dataset with column projection, so
only the columns the schema needs are read from disk. CSV files are read as spreadsheets
and other systems export them: ',' ';' tab or '|' separated, UTF-8 (BOM or not) or UTF-16
with a BOM, CRLF or LF line ends, blank lines and trailing empty columns.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import pyarrow.dataset as pads

from fintwin.data.schema import (
    LINE,
    REQUIRED_COLUMNS,
    SEPARATORS,
    SHOWN_ROWS,
    EventSchema,
    EventValidationError,
    ValidationReport,
    check_columns,
    match_columns,
    validate_events,
)
from fintwin.errors import FintwinInputError

BUILT_IN = ("cdnow", "cdnow_sample", "synthetic")
CDNOW_FILES = {"cdnow": "CDNOW_master.txt", "cdnow_sample": "CDNOW_sample.txt"}
CDNOW_SCHEMA = EventSchema(numeric_features=["cds"])
SNIFF_BYTES = 64 * 1024
ENCODING_NAMES = {"utf-8-sig": "UTF-8", "utf-16": "UTF-16"}
ENCODINGS_READ = "expected UTF-8 (e.g. Excel's 'CSV UTF-8'), with or without a BOM, or UTF-16 with a BOM"
CHUNK_ROWS = 200_000  # CSV rows parsed at a time (all columns) before projection


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


@dataclass(frozen=True)
class CsvFormat:
    """How a CSV file is written: what ``sniff_csv`` found in its first lines."""

    encoding: str
    separator: str
    header: list[str]
    header_line: int  # 1-based; blank lines before the header are skipped


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def sniff_csv(path: Path) -> CsvFormat:
    """Encoding (UTF-8 with or without BOM, UTF-16 with BOM), separator and header of a CSV file.

    The separator is sniffed (``csv.Sniffer``) on the header line alone: data rows with
    decimal commas would make ',' look like the separator of a ';' file.
    """
    with _open_binary(path) as f:
        head = f.read(SNIFF_BYTES)
    encoding = "utf-16" if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    lines = head.decode(encoding, errors="replace").splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise FintwinInputError(f"{path}: empty file; expected a header line naming the columns "
                                f"{list(REQUIRED_COLUMNS)} and one line per event")
    try:
        separator = csv.Sniffer().sniff(lines[first], delimiters=SEPARATORS).delimiter
    except csv.Error:  # a single column: nothing to sniff
        separator = ","
    header = next(csv.reader([lines[first]], delimiter=separator))
    return CsvFormat(encoding, separator, header, first + 1)


def _undecodable(path: Path, encoding: str) -> FintwinInputError:
    """Name the first line that is not UTF-8 (UTF-16 has no byte lines to name)."""
    if encoding == "utf-8-sig":
        with _open_binary(path) as f:
            for number, line in enumerate(f, start=1):
                try:
                    line.decode(encoding)
                except UnicodeDecodeError as err:
                    return FintwinInputError(
                        f"{path}: line {number} is not UTF-8 text (byte "
                        f"{line[err.start:err.start + 1]!r}); " + ENCODINGS_READ)
    return FintwinInputError(f"{path}: not {ENCODING_NAMES[encoding]} text; " + ENCODINGS_READ)


def _quote_hint(separator: str) -> str:
    shown = "tab" if separator == "\t" else repr(separator)
    return f"a value holding the separator {shown} must be quoted (e.g. \"1,234.50\")"


def _refuse_unnamed_values(unnamed: pd.DataFrame, separator: str, source: str) -> None:
    """A value under no column name (an empty header cell or past the header's last column):
    a row split at an unquoted separator."""
    bad = unnamed.notna().to_numpy()
    rows = bad.any(axis=1)
    if rows.any():
        raise EventValidationError(
            source, None, f"a value under no column name ({unnamed.to_numpy()[bad][0]!r}); "
            + _quote_hint(separator), unnamed.index[rows][:SHOWN_ROWS])


def _too_many_fields(err: pd.errors.ParserError, fmt: CsvFormat, source: str) -> FintwinInputError:
    found = re.search(r"in line (\d+), saw (\d+)", str(err))
    if found is None:
        return FintwinInputError(f"{source}: {str(err).strip()}")
    line, fields = found.groups()
    return FintwinInputError(f"{source}: line {line} has {fields} fields, the header "
                             f"{len(fmt.header)}; " + _quote_hint(fmt.separator))


def read_csv(path: Path, schema: EventSchema) -> pd.DataFrame:
    """Read the schema's columns of a CSV file as other systems write it.

    Separator, encoding and header are sniffed (``sniff_csv``); header names match ignoring
    whitespace and case; ids, event types and categorical features are read as text ("007"
    stays "007"); blank lines are skipped; a value under no column name (past the header's
    last column or under an empty header cell) is refused, empty ones (trailing separators)
    are not. The index holds file line
    numbers (named ``line``, assuming no line breaks inside quoted values), so validation
    errors name lines. Read in chunks of all columns, keeping only the wanted ones.
    """
    fmt, source = sniff_csv(path), str(path)
    positions = check_columns(fmt.header, schema, source)
    width = len(fmt.header)  # fields are read up to one past the header's last column
    unnamed = [i for i, name in enumerate(fmt.header) if not name.strip()] + [width]
    textual = {"customer_id", "event_type", *schema.categorical_features}
    try:
        with pd.read_csv(
            path, sep=fmt.separator, encoding=fmt.encoding, header=None, skiprows=fmt.header_line,
            names=range(width + 1), index_col=False, chunksize=CHUNK_ROWS,
            dtype={i: str for i in [*unnamed, *(p for p, n in positions.items() if n in textual)]},
            skip_blank_lines=False, skipinitialspace=True,
        ) as chunks:
            raw = pd.concat([chunk[[*positions, *unnamed]] for chunk in chunks], ignore_index=True)
    except UnicodeDecodeError:
        raise _undecodable(path, fmt.encoding) from None
    except pd.errors.ParserError as err:
        raise _too_many_fields(err, fmt, source) from None
    raw.index = pd.RangeIndex(fmt.header_line + 1, fmt.header_line + 1 + len(raw), name=LINE)
    _refuse_unnamed_values(raw[unnamed], fmt.separator, source)
    return raw[list(positions)].set_axis(list(positions.values()), axis=1).dropna(how="all")


def read_parquet(path: Path, columns: list[str], filter_expr: pads.Expression | None = None) -> pd.DataFrame:
    """Read only ``columns`` (and rows matching ``filter_expr``) of a Parquet file or directory."""
    dataset = pads.dataset(path, format="parquet", partitioning="hive")
    found = dataset.schema.names
    positions = match_columns(found, columns, str(path))
    table = dataset.to_table(columns=[found[p] for p in positions], filter=filter_expr)
    return table.to_pandas().set_axis(list(positions.values()), axis=1)


def merge_same_day(events: pd.DataFrame, numeric_features: list[str]) -> pd.DataFrame:
    """Merge a customer's events of the same type on the same calendar day into one event.

    Amounts and numeric features are summed; the event keeps the day's first timestamp; the
    result is sorted by customer then time. This is the BG/NBD convention for CDNOW (67,591 transactions from 69,659 rows).
    """
    day = events["timestamp"].dt.floor("D")
    keys = [events["customer_id"], day.rename("_day"), events["event_type"]]
    agg = {"timestamp": "min", "amount": "sum", **{c: "sum" for c in numeric_features}}
    extra = [c for c in events.columns if c not in {"customer_id", "event_type", *agg}]
    agg.update({c: "first" for c in extra})
    merged = events.groupby(keys, sort=True, observed=True).agg(agg).reset_index()
    # one day's events of several types come out by type: put them back in time order
    merged = merged.sort_values(["customer_id", "timestamp"], kind="stable", ignore_index=True)
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
        return read_csv(path, schema)
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
