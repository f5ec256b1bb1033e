import numpy as np
import pandas as pd
import pytest

from fintwin.data.schema import (
    EventSchema,
    EventValidationError,
    parse_numbers,
    parse_timestamps,
    validate_events,
)
from fintwin.errors import FintwinInputError


def table(**overrides):
    base = {
        "customer_id": ["a", "a", "b"],
        "timestamp": ["2024-01-02", "2024-01-01T10:00:00", "2024-01-03"],
        "event_type": ["card", "salary", "card"],
        "amount": [1.0, 2.0, 3.0],
    }
    base.update(overrides)
    return pd.DataFrame(base)


def reject(df, match, schema=None, column=None):
    with pytest.raises(EventValidationError, match=match) as info:
        validate_events(df, schema, source="events.csv")
    assert "events.csv" in str(info.value)
    if column:
        assert info.value.column == column
    return info.value


def test_valid_table_is_sorted_and_normalised():
    out, report = validate_events(table(customer_id=[2, 2, 1]), source="t")
    assert list(out["customer_id"]) == ["1", "2", "2"]
    assert out["timestamp"].dtype == "datetime64[ns]"
    assert list(out.loc[out.customer_id == "2", "event_type"]) == ["salary", "card"]
    assert report.was_sorted is False and report.rows == 3


def test_missing_required_column():
    err = reject(table().drop(columns="amount"), "missing required column", column="amount")
    assert "['amount']" in str(err)


def test_unparseable_timestamp_names_row():
    err = reject(table(timestamp=["2024-01-01", "yesterday", "2024-01-03"]),
                 "unparseable timestamp 'yesterday'", column="timestamp")
    assert err.rows == [1]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_amount(bad):
    err = reject(table(amount=[1.0, 2.0, bad]), "NaN or infinite", column="amount")
    assert err.rows == [2]


def test_negative_amount_rejected_unless_allowed():
    reject(table(amount=[1.0, -5.0, 2.0]), "negative value -5.0; expected >= 0", column="amount")
    out, _ = validate_events(table(amount=[1.0, -5.0, 2.0]), EventSchema(allow_negative_amount=True))
    assert out["amount"].min() == -5.0


def test_non_numeric_amount():
    reject(table(amount=["1", "ten", "2"]), "non-numeric value 'ten'", column="amount")


def test_empty_input():
    reject(table().iloc[:0], "empty input")


@pytest.mark.parametrize("ids", [[1.5, 1.5, 2.0], [True, False, True], [None, "a", "b"]])
def test_wrong_customer_id_type(ids):
    reject(table(customer_id=ids), "customer id", column="customer_id")


def test_declared_feature_absent():
    err = reject(table(), "declared in the data config but absent",
                 EventSchema(numeric_features=["balance"]), column="balance")
    assert "numeric" in str(err)


def test_duplicates_counted_kept_or_dropped():
    dup = pd.concat([table(), table().iloc[[0]]], ignore_index=True)
    out, report = validate_events(dup)
    assert report.duplicates == 1 and len(out) == 4
    out, report = validate_events(dup, EventSchema(drop_duplicates=True))
    assert report.duplicates == 1 and report.duplicates_dropped and len(out) == 3


def test_timezone_aware_converted_to_naive_utc():
    out, _ = validate_events(table(timestamp=["2024-01-01T12:00:00+02:00"] * 3))
    assert out["timestamp"].iloc[0] == pd.Timestamp("2024-01-01T10:00:00")


def test_numeric_feature_parsed_and_checked():
    schema = EventSchema(numeric_features=["balance"])
    out, _ = validate_events(table(balance=["1.5", "2", "-3"]), schema)
    assert out["balance"].tolist() == [2.0, 1.5, -3.0]
    reject(table(balance=[1.0, np.nan, 2.0]), "NaN", schema, column="balance")


def test_header_split_at_the_wrong_separator_is_named():
    wrong = pd.DataFrame({"customer_id;timestamp;event_type;amount": ["a;2024-01-01;buy;1"]})
    err = reject(wrong, "missing required column", column="customer_id")
    assert "the header looks ';'-separated" in str(err)


def test_column_names_match_ignoring_whitespace_and_case():
    out, _ = validate_events(table().rename(columns={"customer_id": " Customer_ID ", "amount": "AMOUNT"}))
    assert list(out.columns) == ["customer_id", "timestamp", "event_type", "amount"]
    assert out["amount"].tolist() == [2.0, 1.0, 3.0]


def test_ids_and_event_types_are_stripped():
    out, _ = validate_events(table(customer_id=["a ", " a", "b"], event_type=["card ", "salary", " card"]))
    assert out["customer_id"].tolist() == ["a", "a", "b"] and set(out["event_type"]) == {"card", "salary"}
    reject(table(event_type=["card", "  ", "card"]), "missing value", column="event_type")


@pytest.mark.parametrize("values, decimal, expected", [
    (["1,234.50", "5", "1,000"], None, [1234.5, 5.0, 1000.0]),
    (["1.234,50", "5", "1.000", "12,5"], None, [1234.5, 5.0, 1000.0, 12.5]),
    (["1 234,50", "-2", "1e3"], None, [1234.5, -2.0, 1000.0]),
    (["1.234", "5"], None, [1.234, 5.0]),
    (["1,234", "5"], ",", [1.234, 5.0]),
    (["1,234", "5"], ".", [1234.0, 5.0]),
    ([" 7 ", None, ""], None, [7.0, np.nan, np.nan]),
])
def test_parse_numbers(values, decimal, expected):
    parsed = parse_numbers(pd.Series(values, dtype=object), "amount", "f", decimal)
    np.testing.assert_array_equal(parsed.to_numpy(), expected)


@pytest.mark.parametrize("values, decimal, match, rows", [
    (["1,234", "5"], None, "ambiguous number '1,234'", [0]),
    (["1,234.5", "2", "1.234,5"], None, "mixed decimal marks", [0, 2]),
    (["1", "$5"], None, r"non-numeric value '\$5'; expected a number \(", [1]),
    (["12,5", "1.5"], ",", "non-numeric value '1.5'; expected a number with a decimal comma", [1]),
    (["12,5"], ".", "with a decimal point", [0]),
])
def test_parse_numbers_refuses(values, decimal, match, rows):
    with pytest.raises(EventValidationError, match=match) as info:
        parse_numbers(pd.Series(values, dtype=object), "amount", "f", decimal)
    assert info.value.rows == rows


@pytest.mark.parametrize("values, day_first, expected", [
    (["12/31/2024 13:45", "1/2/2025 1:45 PM", "01/02/2025 12:00 AM"], None,
     ["2024-12-31 13:45", "2025-01-02 13:45", "2025-01-02 00:00"]),
    (["31.12.2024", "01.02.2025 08:30:15.5"], None, ["2024-12-31", "2025-02-01 08:30:15.5"]),
    (["01/02/2025", "03/04/2025"], True, ["2025-02-01", "2025-04-03"]),
    (["01-02-2025"], False, ["2025-01-02"]),
    (["2024-01-01T10:00:00+02:00", "2024-01-01T10:00:00-05:00"], None, ["2024-01-01 08:00", "2024-01-01 15:00"]),
    (["45292.5", "45292,75"], None, ["2024-01-01 12:00", "2024-01-01 18:00"]),
])
def test_parse_timestamps(values, day_first, expected):
    parsed = parse_timestamps(pd.Series(values, dtype=object), "f", day_first=day_first)
    assert parsed.tolist() == [pd.Timestamp(v) for v in expected]


def test_excel_serials_from_a_numeric_column_keep_the_time_of_day():
    parsed = parse_timestamps(pd.Series([45292.5729166667, 45292.0]), "f")
    assert parsed.tolist() == [pd.Timestamp("2024-01-01 13:45"), pd.Timestamp("2024-01-01")]


@pytest.mark.parametrize("values, day_first, match, rows", [
    (["01/02/2025", "03/04/2025"], None, "ambiguous numeric date '01/02/2025'", [0, 1]),
    (["13/02/2025", "02/13/2025"], None, "numeric dates mix orders", [0, 1]),
    (["12/31/2024"], True, r"invalid date or time '12/31/2024' read day first", [0]),
    (["12/31/2024 13:75"], None, "invalid date or time", [0]),
    (["12/31/2024 13:00 PM"], None, "invalid date or time", [0]),
    (["12/31/24"], None, "unparseable timestamp '12/31/24'", [0]),
    (["2024-01-01", "2024-01-02T10:00+01:00", "2024-01-03"], None, "aware and naive timestamps mixed", [1]),
    ([45292.0, 12.0], None, "number 12.0 is no timestamp", [1]),
    (["2024-01-01", " "], None, "missing timestamp", [1]),
])
def test_parse_timestamps_refuses(values, day_first, match, rows):
    with pytest.raises(EventValidationError, match=match) as info:
        parse_timestamps(pd.Series(values, dtype=object if isinstance(values[0], str) else float), "f",
                         day_first=day_first)
    assert info.value.rows == rows


def test_aware_datetimes_mixed_with_naive_ones_refused():
    mixed = pd.Series([pd.Timestamp("2024-01-01", tz="Europe/Berlin"), pd.Timestamp("2024-01-01")], dtype=object)
    with pytest.raises(EventValidationError, match="aware and naive timestamps mixed"):
        parse_timestamps(mixed, "f")


def test_total_row_refused_in_a_table():
    err = reject(table(customer_id=["a", "a", "Grand total"], timestamp=["2024-01-01", "2024-01-02", None]),
                 r"a total row \('Grand total' without a timestamp\)", column="customer_id")
    assert err.rows == [2]


def test_unknown_decimal_mark_refused():
    with pytest.raises(FintwinInputError, match="decimal=';': expected"):
        EventSchema(decimal=";")


def test_parsers_take_empty_columns():
    assert parse_timestamps(pd.Series([], dtype=object), "f").dtype == "datetime64[ns]"
    assert parse_numbers(pd.Series([], dtype=object), "amount", "f").dtype == "float64"
