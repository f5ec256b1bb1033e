"""The event contract: validate a raw event table and normalise it.

One row per event with ``customer_id`` (str or int), ``timestamp`` (datetime or ISO-8601
string, naive UTC), ``event_type`` (str) and ``amount`` (float). Extra columns are declared
in the data config as numeric or categorical features. Every rejection names the source,
the column, the first offending rows and what was expected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fintwin.errors import FintwinInputError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("customer_id", "timestamp", "event_type", "amount")
SHOWN_ROWS = 5


class EventValidationError(FintwinInputError):
    """An event table breaks the event contract."""

    def __init__(self, source: str, column: str | None, problem: str, rows: list[int] | None = None):
        self.source, self.column, self.rows = source, column, rows or []
        where = f"{source}" + (f", column '{column}'" if column else "")
        shown = f" (first offending rows, 0-based: {', '.join(map(str, self.rows))})" if self.rows else ""
        super().__init__(f"{where}: {problem}{shown}")


@dataclass
class EventSchema:
    """What the data config declares about an event table beyond the required columns."""

    numeric_features: list[str] = field(default_factory=list)
    categorical_features: list[str] = field(default_factory=list)
    allow_negative_amount: bool = False
    drop_duplicates: bool = False

    @property
    def columns(self) -> list[str]:
        """All columns a source must provide (for column projection)."""
        return [*REQUIRED_COLUMNS, *self.numeric_features, *self.categorical_features]


@dataclass
class ValidationReport:
    """What validation found and changed."""

    rows: int
    duplicates: int
    duplicates_dropped: bool
    was_sorted: bool


def _offending(mask: np.ndarray, index: pd.Index) -> list[int]:
    """Row labels of the first offending rows."""
    return [int(i) if isinstance(i, (int, np.integer)) else i for i in index[mask][:SHOWN_ROWS]]


def _check_columns(df: pd.DataFrame, schema: EventSchema, source: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise EventValidationError(
            source, missing[0],
            f"missing required column(s) {missing}; expected {list(REQUIRED_COLUMNS)}, "
            f"found {list(df.columns)}",
        )
    for kind, names in (("numeric", schema.numeric_features),
                        ("categorical", schema.categorical_features)):
        absent = [c for c in names if c not in df.columns]
        if absent:
            raise EventValidationError(
                source, absent[0],
                f"{kind} feature column(s) {absent} are declared in the data config but absent; "
                f"found {list(df.columns)}",
            )


def _customer_ids(col: pd.Series, source: str) -> pd.Series:
    """Customer ids must be strings or integers; they are normalised to str."""
    missing = col.isna().to_numpy()
    if missing.any():
        raise EventValidationError(source, "customer_id", "missing customer id; expected str or int",
                                   _offending(missing, col.index))
    if pd.api.types.is_integer_dtype(col) or isinstance(col.dtype, pd.StringDtype):
        return col.astype(str)
    if pd.api.types.is_object_dtype(col):
        bad = ~col.map(lambda v: isinstance(v, (str, int, np.integer))
                       and not isinstance(v, bool)).to_numpy(dtype=bool)
    else:
        bad = np.ones(len(col), dtype=bool)
    if not bad.any():
        return col.astype(str)
    example = col[bad].iloc[0]
    raise EventValidationError(
        source, "customer_id",
        f"wrong type: {example!r} is {type(example).__name__} (column dtype {col.dtype}); "
        "expected str or int customer ids",
        _offending(bad, col.index),
    )


def _timestamps(col: pd.Series, source: str) -> pd.Series:
    """Parse datetimes or ISO-8601 strings; timezone-aware values are converted to naive UTC."""
    if pd.api.types.is_datetime64_any_dtype(col):
        parsed = col
    else:
        parsed = pd.to_datetime(col, errors="coerce", format="ISO8601", utc=True)
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    bad = parsed.isna().to_numpy()
    if bad.any():
        example = col[bad].iloc[0]
        raise EventValidationError(
            source, "timestamp",
            f"unparseable timestamp {example!r}; expected a datetime or ISO-8601 string "
            "(e.g. 2024-03-01 or 2024-03-01T12:30:00)",
            _offending(bad, col.index),
        )
    return parsed.astype("datetime64[ns]")


def _numbers(col: pd.Series, name: str, source: str, allow_negative: bool) -> pd.Series:
    """Finite floats; negative values only when allowed."""
    values = pd.to_numeric(col, errors="coerce").astype("float64")
    not_numeric = values.isna().to_numpy() & col.notna().to_numpy()
    if not_numeric.any():
        raise EventValidationError(
            source, name, f"non-numeric value {col[not_numeric].iloc[0]!r}; expected a number",
            _offending(not_numeric, col.index),
        )
    arr = values.to_numpy()
    bad = ~np.isfinite(arr)
    if bad.any():
        raise EventValidationError(source, name, "NaN or infinite value; expected a finite number",
                                   _offending(bad, col.index))
    if not allow_negative and (arr < 0).any():
        neg = arr < 0
        raise EventValidationError(
            source, name,
            f"negative value {arr[neg][0]}; expected >= 0 (set data.schema.allow_negative_amount"
            " to accept negative amounts)" if name == "amount" else
            f"negative value {arr[neg][0]}; expected >= 0",
            _offending(neg, col.index),
        )
    return values


def _strings(col: pd.Series, name: str, source: str) -> pd.Series:
    bad = col.isna().to_numpy()
    if bad.any():
        raise EventValidationError(source, name, "missing value; expected a non-empty string",
                                   _offending(bad, col.index))
    return col.astype(str)


def validate_events(
    df: pd.DataFrame, schema: EventSchema | None = None, source: str = "events"
) -> tuple[pd.DataFrame, ValidationReport]:
    """Validate ``df`` against the event contract and return it normalised and sorted.

    The result has the required columns (customer_id str, timestamp datetime64[ns],
    event_type str, amount float64) and the declared feature columns, sorted by customer
    then time, with a fresh RangeIndex. Raises EventValidationError on any violation.
    """
    schema = schema or EventSchema()
    if len(df) == 0:
        raise EventValidationError(source, None, "empty input: no event rows; expected at least one")
    _check_columns(df, schema, source)
    out = pd.DataFrame({
        "customer_id": _customer_ids(df["customer_id"], source),
        "timestamp": _timestamps(df["timestamp"], source),
        "event_type": _strings(df["event_type"], "event_type", source),
        "amount": _numbers(df["amount"], "amount", source, schema.allow_negative_amount),
    })
    for name in schema.numeric_features:
        out[name] = _numbers(df[name], name, source, allow_negative=True)
    for name in schema.categorical_features:
        out[name] = df[name].astype("string").fillna("<missing>").astype(str)

    duplicated = out.duplicated(keep="first").to_numpy()
    n_dup = int(duplicated.sum())
    if n_dup:
        log.warning("%s: %d exact duplicate rows%s", source, n_dup,
                    " dropped" if schema.drop_duplicates else " kept (data.schema.drop_duplicates=false)")
        if schema.drop_duplicates:
            out = out[~duplicated]

    key = out["customer_id"].to_numpy()
    ts = out["timestamp"].to_numpy()
    order = np.lexsort((ts, key))
    was_sorted = bool(np.all(order[1:] > order[:-1])) if len(order) > 1 else True
    if not was_sorted:
        out = out.iloc[order]
    out = out.reset_index(drop=True)
    return out, ValidationReport(len(out), n_dup, schema.drop_duplicates and n_dup > 0, was_sorted)
