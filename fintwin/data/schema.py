"""The event contract: validate a raw event table and normalise it.

One row per event with ``customer_id`` (str or int), ``timestamp`` (datetime or ISO-8601
string, naive UTC), ``event_type`` (str) and ``amount`` (float). Extra columns are declared
in the data config as numeric or categorical features. Every rejection names the source,
the column, the first offending rows (file lines when the table's index is named ``line``)
and what was expected.

Values as other systems write them are read by small public parsers, each deciding per
column and refusing what stays ambiguous:

- column names match ignoring surrounding whitespace and case (`` Customer_ID ``);
- ``parse_numbers``: a decimal point or a decimal comma, with thousands separators
  (``1,234.50``, ``1.234,50``, ``1 234,50``); the mark is the one every value of the column
  reads with; ``1,234`` alone could be either and is refused unless declared, ``1.234``
  alone reads with a decimal point (as pandas and spreadsheets read it);
- ``parse_timestamps``: ISO-8601 (offsets converted to naive UTC; aware mixed with naive
  refused), ``31/12/2024 13:45`` or ``12/31/2024 1:45 PM`` (day or month first, as the
  column's values show or as declared; refused when no value tells) and Excel serial day
  numbers (``45292.5``, between 1970 and 2099).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fintwin.errors import FintwinInputError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("customer_id", "timestamp", "event_type", "amount")
SHOWN_ROWS = 5
LINE = "line"  # index name of a table read from a file: labels are 1-based file lines
SEPARATORS = ",;\t|"  # field separators read from files
DECIMAL_MARKS = (".", ",")

_GROUP = "[ \u00a0\u202f]"  # thousands separators either convention may use
DOT_NUMBER = re.compile(rf"[+-]?(?:\d{{1,3}}(?:(?:,|{_GROUP})\d{{3}})+|\d+)(?:\.\d*)?")
COMMA_NUMBER = re.compile(rf"[+-]?(?:\d{{1,3}}(?:(?:\.|{_GROUP})\d{{3}})+|\d+)(?:,\d*)?")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
ISO_OFFSET = re.compile(r"\d\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$")  # after the date part
NUMERIC_DATE = re.compile(
    r"(?P<first>\d{1,2})[./-](?P<second>\d{1,2})[./-](?P<year>\d{4})"
    r"(?:[ T]+(?P<hour>\d{1,2}):(?P<minute>\d{2})(?::(?P<second_of_minute>\d{2}(?:\.\d+)?))?"
    r"\s*(?P<half>[AaPp][Mm])?)?"
)
EXCEL_EPOCH = pd.Timestamp("1899-12-30")
EXCEL_SERIALS = (25569, 73051)  # 1970-01-01 up to 2100-01-01 (exclusive)
TOTAL_LABEL = re.compile(r"\s*(?:grand\s*total|sub-?total|totals?|sum)\b", re.IGNORECASE)
TIMESTAMP_FORMS = (
    "a datetime, an ISO-8601 string (2024-03-01, 2024-03-01T12:30:00, with or without an "
    "offset such as +02:00), a numeric date with an optional time (31/12/2024 13:45, "
    "12/31/2024 1:45 PM, 31.12.2024) or an Excel serial day number (45292.5)"
)
DAY_FIRST_HINT = (
    "declare the order (fintwin data summary --day-first or --month-first; "
    "EventSchema(day_first=...)) or write ISO-8601 dates (2024-12-31)"
)
DECIMAL_HINT = "declare the mark (fintwin data summary --decimal . or --decimal ,; EventSchema(decimal=...))"


class EventValidationError(FintwinInputError):
    """An event table breaks the event contract."""

    def __init__(self, source: str, column: str | None, problem: str,
                 rows: pd.Index | Sequence | None = None):
        labels = [] if rows is None else list(rows)
        self.source, self.column = source, column
        self.rows = [int(i) if isinstance(i, (int, np.integer)) else i for i in labels]
        unit = "lines" if getattr(rows, "name", None) == LINE else "rows, 0-based"
        where = f"{source}" + (f", column '{column}'" if column else "")
        shown = f" (first offending {unit}: {', '.join(map(str, self.rows))})" if self.rows else ""
        super().__init__(f"{where}: {problem}{shown}")


@dataclass
class EventSchema:
    """What the data config declares about an event table beyond the required columns.

    ``day_first`` and ``decimal`` settle numeric dates and decimal marks that the values
    leave ambiguous (None: decide from the values, refuse when they do not tell).
    """

    numeric_features: list[str] = field(default_factory=list)
    categorical_features: list[str] = field(default_factory=list)
    allow_negative_amount: bool = False
    drop_duplicates: bool = False
    day_first: bool | None = None
    decimal: str | None = None

    def __post_init__(self) -> None:
        if self.decimal not in (None, *DECIMAL_MARKS):
            raise FintwinInputError(f"decimal={self.decimal!r}: expected '.', ',' or None")

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


def _offending(mask: np.ndarray | pd.Series, index: pd.Index) -> pd.Index:
    """Labels of the first offending rows (the index keeps its name: lines or rows)."""
    return index[np.asarray(mask, dtype=bool)][:SHOWN_ROWS]


def _first(col: pd.Series, mask: np.ndarray | pd.Series) -> object:
    return col[np.asarray(mask, dtype=bool)].iloc[0]


def match_columns(found: Sequence, wanted: Sequence[str], source: str) -> dict[int, str]:
    """Positions in ``found`` of the ``wanted`` column names, ignoring surrounding whitespace
    and case; two found columns that both match one wanted name are refused."""
    keys = {name.casefold(): name for name in wanted}
    positions: dict[int, str] = {}
    for pos, name in enumerate(found):
        match = keys.get(str(name).strip().casefold())
        if match is None:
            continue
        twin = next((p for p, m in positions.items() if m == match), None)
        if twin is not None:
            raise EventValidationError(
                source, match, f"columns {str(found[twin])!r} and {str(name)!r} both name "
                f"'{match}'; keep one")
        positions[pos] = match
    return positions


def _separator_hint(found: Sequence) -> str:
    """Why a header may lack the required columns: it was split at the wrong separator."""
    for name in map(str, found):
        for sep in (*SEPARATORS, " ", ":"):
            parts = [p.strip().strip('"').casefold() for p in name.split(sep)]
            if sep in name and set(REQUIRED_COLUMNS) & set(parts):
                shown = "tab" if sep == "\t" else repr(sep)
                return (f"; the header looks {shown}-separated (separators read: "
                        "',' ';' tab '|')")
    return ""


def check_columns(found: Sequence, schema: EventSchema, source: str) -> dict[int, str]:
    """Positions of the required and declared columns in ``found`` (see ``match_columns``);
    raises when one is missing."""
    positions = match_columns(found, schema.columns, source)
    present = set(positions.values())
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise EventValidationError(
            source, missing[0],
            f"missing required column(s) {missing}; expected {list(REQUIRED_COLUMNS)}, "
            f"found {[str(c) for c in found]}{_separator_hint(found)}",
        )
    for kind, names in (("numeric", schema.numeric_features),
                        ("categorical", schema.categorical_features)):
        absent = [c for c in names if c not in present]
        if absent:
            raise EventValidationError(
                source, absent[0],
                f"{kind} feature column(s) {absent} are declared in the data config but absent; "
                f"found {[str(c) for c in found]}",
            )
    return positions


def _text(col: pd.Series) -> pd.Series:
    """Values as stripped strings (string dtype); empty strings become missing."""
    text = col.astype("string").str.strip()
    return text.mask(text == "")


def _matches(text: pd.Series, pattern: re.Pattern) -> np.ndarray:
    return text.str.fullmatch(pattern).fillna(False).to_numpy(dtype=bool)


def _to_float(text: pd.Series) -> np.ndarray:
    return pd.to_numeric(text, errors="coerce").astype("Float64").to_numpy(dtype="float64",
                                                                           na_value=np.nan)


def _read_with_mark(text: pd.Series, decimal: str) -> np.ndarray:
    """Numbers of ``text`` read with the decimal ``decimal`` (the other mark groups thousands)."""
    thousands = "," if decimal == "." else "."
    cleaned = text.str.replace(rf"[{re.escape(thousands)} \u00a0\u202f]", "", regex=True)
    return _to_float(cleaned.str.replace(",", ".", regex=False) if decimal == "," else cleaned)


def _decimal_mark(text: pd.Series, dot_ok: np.ndarray, comma_ok: np.ndarray, name: str,
                  source: str) -> str:
    """The decimal mark every value of the column reads with; refuses mixes and ambiguity."""
    dot_only, comma_only = dot_ok & ~comma_ok, comma_ok & ~dot_ok
    if dot_only.any() and comma_only.any():
        raise EventValidationError(
            source, name,
            f"mixed decimal marks: {_first(text, dot_only)!r} has a decimal point, "
            f"{_first(text, comma_only)!r} a decimal comma; expected one mark per column",
            _offending(dot_only | comma_only, text.index))
    if comma_only.any():
        return ","
    ambiguous = dot_ok & text.str.contains(",", regex=False).fillna(False).to_numpy(dtype=bool)
    if not dot_only.any() and ambiguous.any():
        example = _first(text, ambiguous)
        raise EventValidationError(
            source, name,
            f"ambiguous number {example!r}: a thousands separator or a decimal comma; "
            + DECIMAL_HINT, _offending(ambiguous, text.index))
    return "."


def parse_numbers(col: pd.Series, name: str, source: str, decimal: str | None = None) -> pd.Series:
    """Text or numbers as float64 (missing values stay NaN).

    Text may group thousands and use a decimal point or comma (``1,234.50``, ``1.234,50``);
    ``decimal`` ('.' or ',') declares the mark, None takes the one every value reads with.
    Raises EventValidationError naming the rows of values that are no number.
    """
    if pd.api.types.is_numeric_dtype(col):
        return col.astype("float64")
    text = _text(col)
    present = text.notna().to_numpy()
    plain = _to_float(text)
    parsed_plain = ~np.isnan(plain)
    if decimal is None and (parsed_plain | ~present).all():
        return pd.Series(plain, index=col.index, dtype="float64")
    no_mark = ~text.str.contains(r"[.,]", regex=True).fillna(False).to_numpy(dtype=bool)
    dot_ok = parsed_plain | _matches(text, DOT_NUMBER)
    comma_ok = (parsed_plain & no_mark) | _matches(text, COMMA_NUMBER)
    readable = {".": dot_ok, ",": comma_ok}
    unreadable = present & ~(readable[decimal] if decimal else dot_ok | comma_ok)
    if unreadable.any():
        mark = {".": " with a decimal point", ",": " with a decimal comma"}.get(decimal, "")
        raise EventValidationError(
            source, name, f"non-numeric value {_first(col, unreadable)!r}; expected a number{mark} "
            "(1234.5, 1,234.50, 1.234,50)",
            _offending(unreadable, col.index))
    decimal = decimal or _decimal_mark(text, dot_ok, comma_ok, name, source)
    return pd.Series(_read_with_mark(text, decimal), index=col.index, dtype="float64")


def _finite(values: pd.Series, name: str, source: str, allow_negative: bool) -> pd.Series:
    """Finite floats; negative values only when allowed."""
    arr = values.to_numpy()
    bad = ~np.isfinite(arr)
    if bad.any():
        raise EventValidationError(source, name, "NaN or infinite value (or an empty cell); expected "
                                   "a finite number", _offending(bad, values.index))
    if not allow_negative and (arr < 0).any():
        neg = arr < 0
        raise EventValidationError(
            source, name,
            f"negative value {arr[neg][0]}; expected >= 0 (set data.schema.allow_negative_amount"
            " to accept negative amounts)" if name == "amount" else
            f"negative value {arr[neg][0]}; expected >= 0",
            _offending(neg, values.index),
        )
    return values


def _naive_utc(parsed: pd.Series) -> pd.Series:
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]")


def _naive_iso(col: pd.Series) -> pd.Series | None:
    """The common case in one pandas call: every value a naive ISO-8601 string (else None).

    pandas gives later naive values the first value's offset, so a first value with an
    offset goes the careful way."""
    if len(col) and ISO_OFFSET.search(str(col.iloc[0])[10:]):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            parsed = pd.to_datetime(col, format="ISO8601")
    except (ValueError, TypeError, OverflowError, Warning):
        return None
    naive = isinstance(parsed.dtype, np.dtype) and parsed.dtype.kind == "M"
    return parsed.astype("datetime64[ns]") if naive and parsed.notna().all() else None


def _excel_serials(numbers: pd.Series, name: str, source: str) -> pd.Series:
    """Excel serial day numbers (days since 1899-12-30, the fraction is the time of day)."""
    low, high = EXCEL_SERIALS
    bad = ~numbers.between(low, high, inclusive="left").to_numpy()
    if bad.any():
        raise EventValidationError(
            source, name,
            f"number {_first(numbers, bad)!r} is no timestamp: numbers are read as Excel serial "
            f"day numbers, {low} (1970-01-01) to {high - 1} (2099-12-31); expected {TIMESTAMP_FORMS}",
            _offending(bad, numbers.index))
    days = pd.to_timedelta(numbers.to_numpy(), unit="D").round("ms")
    return pd.Series(EXCEL_EPOCH + days, index=numbers.index).astype("datetime64[ns]")


def _refuse_aware_with_naive(text: pd.Series, aware: np.ndarray, name: str, source: str) -> None:
    naive = ~aware
    if aware.any() and naive.any():
        minority = aware if aware.sum() <= naive.sum() else naive
        raise EventValidationError(
            source, name,
            f"timezone-aware and naive timestamps mixed ({_first(text, aware)!r} has an offset, "
            f"{_first(text, naive)!r} none); expected all with an offset or all without (naive = UTC)",
            _offending(minority, text.index))


def _iso_timestamps(text: pd.Series, aware: np.ndarray) -> np.ndarray:
    parsed = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=bool(aware.any()))
    return _naive_utc(parsed).to_numpy()


def _is_day_first(text: pd.Series, first: pd.Series, second: pd.Series, name: str,
                  source: str) -> bool:
    """Day or month first, as the values show (a field above 12 is the day); refuses when
    they show both or neither."""
    day_first, month_first = (first > 12).to_numpy(), (second > 12).to_numpy()
    if day_first.any() and month_first.any():
        raise EventValidationError(
            source, name,
            f"numeric dates mix orders: {_first(text, day_first)!r} is day first, "
            f"{_first(text, month_first)!r} month first; expected one order per column",
            _offending(day_first | month_first, text.index))
    if not (day_first.any() or month_first.any()):
        dated = first.notna().to_numpy()
        raise EventValidationError(
            source, name,
            f"ambiguous numeric date {_first(text, dated)!r}: no value shows whether the day or the "
            f"month comes first; {DAY_FIRST_HINT}", _offending(dated, text.index))
    return bool(day_first.any())


def _time_of_day(parts: pd.DataFrame) -> pd.Series:
    """The optional time of numeric dates (24-hour, or 12-hour with AM/PM); NaT where invalid."""
    hour, minute, second = (pd.to_numeric(parts[c]).astype("float64").fillna(0)
                            for c in ("hour", "minute", "second_of_minute"))
    half = parts["half"].str.upper().fillna("")
    twelve = (half != "").to_numpy()
    valid = np.where(twelve, hour.between(1, 12), hour <= 23) & (minute <= 59) & (second < 60)
    hour = hour.where(~twelve, hour % 12 + 12 * (half == "PM"))
    return pd.to_timedelta(hour * 3600 + minute * 60 + second, unit="s").where(valid)


def _numeric_dates(text: pd.Series, name: str, source: str, day_first: bool | None) -> np.ndarray:
    """``31/12/2024 13:45``, ``12/31/2024 1:45 PM``, ``31.12.2024``: NaT where no such date."""
    parts = text.str.extract(f"^{NUMERIC_DATE.pattern}$")
    dated = parts["year"].notna().to_numpy()
    if not dated.any():
        return np.full(len(text), np.datetime64("NaT"), dtype="datetime64[ns]")
    first, second, year = (pd.to_numeric(parts[c]).astype("float64") for c in ("first", "second", "year"))
    if day_first is None:
        day_first = _is_day_first(text, first, second, name, source)
    day, month = (first, second) if day_first else (second, first)
    stamps = pd.to_datetime(pd.DataFrame({"year": year, "month": month, "day": day}), errors="coerce")
    stamps = stamps + _time_of_day(parts)
    invalid = dated & stamps.isna().to_numpy()
    if invalid.any():
        order = "day first (31/12/2024)" if day_first else "month first (12/31/2024)"
        raise EventValidationError(source, name, f"invalid date or time {_first(text, invalid)!r} "
                                   f"read {order}", _offending(invalid, text.index))
    return stamps.to_numpy()


def parse_timestamps(col: pd.Series, source: str, name: str = "timestamp",
                     day_first: bool | None = None) -> pd.Series:
    """Datetimes, ISO-8601 strings, numeric dates or Excel serial day numbers as naive UTC.

    Offsets are converted to UTC; a column mixing values with and without an offset is
    refused. Numeric dates are day first or month first as ``day_first`` declares, else as
    the values show (refused when no value tells). Raises EventValidationError naming rows.
    """
    missing = col.isna().to_numpy()
    if missing.any():
        raise EventValidationError(source, name, f"missing timestamp; expected {TIMESTAMP_FORMS}",
                                   _offending(missing, col.index))
    if pd.api.types.is_datetime64_any_dtype(col):
        return _naive_utc(col)
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return _excel_serials(col.astype("float64"), name, source)
    fast = _naive_iso(col)
    if fast is not None:
        return fast
    text = _text(col)
    empty = text.isna().to_numpy()
    if empty.any():
        raise EventValidationError(source, name, f"missing timestamp; expected {TIMESTAMP_FORMS}",
                                   _offending(empty, col.index))
    iso = text.str.match(ISO_DATE).to_numpy(dtype=bool)
    if not iso.any():
        numbers = _to_float(text.str.replace(",", ".", regex=False))  # 45292,5 from a ';' file
        if not np.isnan(numbers).any():
            return _excel_serials(pd.Series(numbers, index=col.index), name, source)
    aware = iso & text.str.slice(10).str.contains(ISO_OFFSET).to_numpy(dtype=bool)
    _refuse_aware_with_naive(text, aware, name, source)
    parsed = np.full(len(text), np.datetime64("NaT"), dtype="datetime64[ns]")
    parsed[iso] = _iso_timestamps(text[iso], aware[iso])
    parsed[~iso] = _numeric_dates(text[~iso], name, source, day_first)
    bad = np.isnat(parsed)
    if bad.any():
        raise EventValidationError(
            source, name, f"unparseable timestamp {_first(col, bad)!r}; expected {TIMESTAMP_FORMS}",
            _offending(bad, col.index))
    return pd.Series(parsed, index=col.index)


def _customer_ids(col: pd.Series, source: str) -> pd.Series:
    """Customer ids must be strings or integers; they are normalised to stripped str."""
    missing = col.isna().to_numpy()
    if not missing.any():
        ids = _valid_ids(col, source).astype(str).str.strip()
        missing = (ids == "").to_numpy()
    if missing.any():
        raise EventValidationError(source, "customer_id", "missing customer id; expected str or int",
                                   _offending(missing, col.index))
    return ids


def _valid_ids(col: pd.Series, source: str) -> pd.Series:
    if pd.api.types.is_integer_dtype(col) or isinstance(col.dtype, pd.StringDtype):
        return col
    if pd.api.types.is_object_dtype(col):
        bad = ~col.map(lambda v: isinstance(v, (str, int, np.integer))
                       and not isinstance(v, bool)).to_numpy(dtype=bool)
    else:
        bad = np.ones(len(col), dtype=bool)
    if not bad.any():
        return col
    example = _first(col, bad)
    raise EventValidationError(
        source, "customer_id",
        f"wrong type: {example!r} is {type(example).__name__} (column dtype {col.dtype}); "
        "expected str or int customer ids",
        _offending(bad, col.index),
    )


def _strings(col: pd.Series, name: str, source: str) -> pd.Series:
    text = col.astype(str).str.strip()
    bad = col.isna().to_numpy() | (text == "").to_numpy()
    if bad.any():
        raise EventValidationError(source, name, "missing value; expected a non-empty string",
                                   _offending(bad, col.index))
    return text


def _refuse_total_rows(df: pd.DataFrame, source: str) -> None:
    """An exporter's total line (``Total;;;1,234.50``) is no event."""
    undated = df[df["timestamp"].isna().to_numpy()]
    for name in ("customer_id", "event_type"):
        total = undated[name].astype("string").str.match(TOTAL_LABEL).fillna(False).to_numpy(dtype=bool)
        if total.any():
            raise EventValidationError(
                source, name,
                f"a total row ({_first(undated[name], total)!r} without a timestamp); expected one "
                "row per event: delete the total row", _offending(total, undated.index))


def normalise_events(df: pd.DataFrame, schema: EventSchema, source: str = "events") -> pd.DataFrame:
    """The contract's columns of ``df`` (named as ``schema`` names them) parsed and checked
    value by value: customer_id str, timestamp datetime64[ns], event_type str, amount
    float64, then the declared feature columns; rows keep their order and index. Raises
    EventValidationError naming the column and rows. (``validate_events`` also matches column
    names, refuses empty tables and total rows, counts duplicates and sorts.)"""
    out = pd.DataFrame({
        "customer_id": _customer_ids(df["customer_id"], source),
        "timestamp": parse_timestamps(df["timestamp"], source, day_first=schema.day_first),
        "event_type": _strings(df["event_type"], "event_type", source),
        "amount": _finite(parse_numbers(df["amount"], "amount", source, schema.decimal), "amount",
                          source, schema.allow_negative_amount),
    })
    for name in schema.numeric_features:
        out[name] = _finite(parse_numbers(df[name], name, source, schema.decimal), name, source,
                            allow_negative=True)
    for name in schema.categorical_features:
        out[name] = df[name].astype("string").fillna("<missing>").astype(str)
    return out


def validate_events(
    df: pd.DataFrame, schema: EventSchema | None = None, source: str = "events"
) -> tuple[pd.DataFrame, ValidationReport]:
    """Validate ``df`` against the event contract and return it normalised and sorted.

    The result has the required columns (customer_id str, timestamp datetime64[ns],
    event_type str, amount float64) and the declared feature columns, sorted by customer
    then time, with a fresh RangeIndex. Raises EventValidationError on any violation.
    """
    schema = schema or EventSchema()
    positions = check_columns(list(df.columns), schema, source)
    df = df.iloc[:, list(positions)].set_axis(list(positions.values()), axis=1)
    if len(df) == 0:
        raise EventValidationError(source, None, "empty input: no event rows; expected at least one")
    _refuse_total_rows(df, source)
    out = normalise_events(df, schema, source)

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
