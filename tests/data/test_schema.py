import numpy as np
import pandas as pd
import pytest

from fintwin.data.schema import EventSchema, EventValidationError, validate_events


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
