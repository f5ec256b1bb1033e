import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from fintwin.data.schema import EventSchema
from fintwin.data.sources import load_events, merge_same_day, read_parquet
from fintwin.errors import FintwinInputError


def test_cdnow_counts_and_range():
    events, report = load_events("cdnow")
    assert len(events) == 69_659
    assert events["customer_id"].nunique() == 23_570
    assert events["timestamp"].min() == pd.Timestamp("1997-01-01")
    assert events["timestamp"].max() == pd.Timestamp("1998-06-30")
    first = events.groupby("customer_id")["timestamp"].min()
    assert first.max() < pd.Timestamp("1997-04-01")  # the cohort's first purchases are in Q1 1997
    assert set(events["event_type"]) == {"purchase"}
    assert events["cds"].min() >= 1 and report.duplicates == 255


def test_cdnow_same_day_merge_matches_literature():
    events, _ = load_events("cdnow", same_day_merge=True)
    assert len(events) == 67_591
    assert (events["timestamp"] < "1997-10-01").sum() == 47_907


def test_merge_same_day_sums_amount_and_features():
    df = pd.DataFrame({"customer_id": ["a", "a", "a"],
                       "timestamp": pd.to_datetime(["2024-01-01 09:00", "2024-01-01 18:00", "2024-01-02 00:00"]),
                       "event_type": ["buy", "buy", "buy"], "amount": [1.0, 2.0, 4.0], "n": [1.0, 1.0, 3.0]})
    out = merge_same_day(df, ["n"])
    assert out["amount"].tolist() == [3.0, 4.0] and out["n"].tolist() == [2.0, 3.0]
    assert out["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 09:00")


def test_merge_same_day_keeps_each_customers_events_in_time_order():
    """A day's events of several types are merged per type and come back in time order, not
    in the order of their type names (the sequence builder refuses a table out of order)."""
    df = pd.DataFrame({"customer_id": ["a", "a", "a", "b"],
                       "timestamp": pd.to_datetime(["2024-01-01 09:00", "2024-01-01 15:00",
                                                    "2024-01-01 18:00", "2024-01-01 08:00"]),
                       "event_type": ["zeta", "alpha", "zeta", "alpha"], "amount": [1.0, 2.0, 4.0, 8.0]})
    out = merge_same_day(df, [])
    assert out["customer_id"].tolist() == ["a", "a", "b"]
    assert out["event_type"].tolist() == ["zeta", "alpha", "alpha"]
    assert out["amount"].tolist() == [5.0, 2.0, 8.0]
    assert out.index.tolist() == [0, 1, 2]


def test_csv_keeps_string_ids(tmp_path, events):
    events = events.assign(customer_id="00" + events["customer_id"].str[1:])
    path = tmp_path / "events.csv"
    events.to_csv(path, index=False)
    loaded, _ = load_events(str(path))
    assert loaded["customer_id"].iloc[0].startswith("00") and len(loaded) == len(events)


def test_parquet_directory_projects_columns(tmp_path, events):
    events = events.assign(blob="x" * 1000, balance=1.0, bucket=events.index % 3)
    pads.write_dataset(pa.Table.from_pandas(events), tmp_path / "ds", format="parquet",
                       partitioning=pads.partitioning(pa.schema([("bucket", pa.int64())]), flavor="hive"))
    schema = EventSchema(numeric_features=["balance"])
    raw = read_parquet(tmp_path / "ds", schema.columns)
    assert list(raw.columns) == schema.columns  # the wide 'blob' column is never read
    loaded, _ = load_events(str(tmp_path / "ds"), schema)
    assert len(loaded) == len(events) and loaded["balance"].eq(1.0).all()


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(FintwinInputError, match="no such file"):
        load_events(str(tmp_path / "nope.csv"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(FintwinInputError, match="unsupported file type '.json'"):
        load_events(str(tmp_path / "x.json"))


def test_bad_csv_names_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("customer_id,timestamp,event_type\n1,2024-01-01,a\n")
    with pytest.raises(FintwinInputError, match=r"bad.csv, column 'amount': missing required column"):
        load_events(str(path))


def test_parquet_column_names_match_ignoring_whitespace_and_case(tmp_path, events):
    path = tmp_path / "events.parquet"
    events.rename(columns={"customer_id": "Customer_ID ", "amount": "AMOUNT"}).assign(blob="x").to_parquet(path)
    raw = read_parquet(path, EventSchema().columns)
    assert list(raw.columns) == EventSchema().columns and raw["amount"].equals(events["amount"])


def test_csv_errors_name_file_lines(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("customer_id,timestamp,event_type,amount\na,2024-01-01,buy,1\nb,,buy,2\n")
    with pytest.raises(FintwinInputError, match=r"column 'timestamp': missing timestamp; .*first offending "
                                                r"lines: 3\)"):
        load_events(str(path))
