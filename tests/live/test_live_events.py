"""Raw live events: read by the event contract's parsers and featurised by the model's
FeaturiserSpec, one row at a time; bad rows are refused naming the row and field; stream
cursors and positions; JSON lines for `fintwin live run`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fintwin.data.features import OOV_ID, FeaturiserSpec, Vocab
from fintwin.data.schema import EventValidationError
from fintwin.live.events import event_fields, position_key, read_events
from fintwin.live.runner import jsonl_events

SPEC = FeaturiserSpec(
    Vocab(("card", "salary")), max_len=16, horizon_days=30.0,
    numeric_features=("balance",), categorical_features=("channel",),
    categorical_vocabs=(Vocab(("app", "branch")),),
)


def request(**changes) -> dict[str, np.ndarray]:
    """Four events of three customers, as Triton hands them to the model ([rows, 1])."""
    columns = {
        "customer_id": [b"c2", b"c1", b" c1 ", b"c3"],
        "timestamp": [b"2024-07-01T10:00:00", b"2024-07-01T14:00:00+02:00", b"1719828000.25",
                      b"2024-07-02"],
        "event_type": [b"card", b"salary", b"crypto", b"card"],
        "amount": np.array([1.5, 2.0, 3.0, 0.0], np.float32),
        "balance": np.array([10.0, -5.0, 0.0, 1.0], np.float32),
        "channel": [b"app", b"atm", b"branch", b"app"],
    } | changes
    return {name: np.array(values, dtype=object if isinstance(values, list) else None).reshape(-1, 1)
            for name, values in columns.items() if values is not None}


def test_rows_are_read_per_event_sorted_by_customer_then_time():
    batch = read_events(request(), SPEC)

    assert batch.rows.tolist() == [2, 1, 0, 3]  # c1's epoch event (10:00 UTC) before 12:00 UTC
    assert batch.customer_ids.tolist() == ["c1", "c1", "c2", "c3"]
    assert batch.timestamps_ns.view("datetime64[ns]").astype(str).tolist() == [
        "2024-07-01T10:00:00.250000000", "2024-07-01T12:00:00.000000000",
        "2024-07-01T10:00:00.000000000", "2024-07-02T00:00:00.000000000",
    ]
    features = batch.features
    assert features["event_type"].tolist() == [OOV_ID, 3, 2, 2]  # crypto: unknown type
    assert features["categorical"][:, 0].tolist() == [3, OOV_ID, 2, 2]  # atm: unknown channel
    assert features["numeric"][:, 0].tolist() == [0.0, -5.0, 10.0, 1.0]
    assert features["hour"].tolist() == [10, 12, 10, 0]
    assert features["day_of_week"].tolist() == [0, 0, 0, 1]  # Monday 1 July 2024
    assert batch.consumer is None and batch.positions.tolist() == ["", "", "", ""]


def test_each_row_is_read_as_it_would_be_alone():
    """What a row means never depends on the rows sent with it (requests are read together)."""
    together = read_events(request(), SPEC)
    for row in range(4):
        alone = read_events({k: v[row : row + 1] for k, v in request().items()}, SPEC)
        at = int(np.flatnonzero(together.rows == row)[0])
        assert alone.timestamps_ns[0] == together.timestamps_ns[at]
        for name, values in alone.features.items():
            if name != "delta_t":
                np.testing.assert_array_equal(values[0], together.features[name][at])


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"timestamp": [b"2024-07-01", b"yesterday", b"2024-07-01", b"2024-07-01"]}, "timestamp",
         "unparseable timestamp 'yesterday'; expected an ISO-8601 timestamp"),
        ({"timestamp": [b"2024-07-01", b"2024-07-01", b"2024-07-01", b"01/07/2024"]}, "timestamp",
         "unparseable timestamp '01/07/2024'"),
        ({"timestamp": [b"2024-07-01", b"2024-07-01", b"2024-13-45", b"2024-07-01"]}, "timestamp",
         "2024-13-45"),
        ({"amount": np.array([1, np.nan, 2, 3], np.float32)}, "amount", "NaN or infinite value"),
        ({"amount": np.array([1, 2, -2, 3], np.float32)}, "amount", "negative value -2.0"),
        ({"balance": np.array([1, 2, 3, np.inf], np.float32)}, "balance", "NaN or infinite"),
        ({"customer_id": [b"c1", b"", b"c2", b"c3"]}, "customer_id", "missing customer id"),
        ({"event_type": [b"card", b"card", b"  ", b"card"]}, "event_type", "missing value"),
        ({"event_type": [b"card", b"card", b"\xff", b"card"]}, "event_type", "is not UTF-8 text"),
        ({"amount": None}, "amount", "missing field; every event needs customer_id (text)"),
        ({"cursor": [b"w:1", b"w:2", b"v:3", b"w:4"]}, "cursor", "cursors of several consumers"),
        ({"cursor": [b"w:1", b"w", b"", b"w:4"]}, "cursor", "expected CONSUMER:POSITION"),
    ],
)
def test_a_bad_row_is_refused_naming_its_row_and_field(changes, field, words):
    with pytest.raises(EventValidationError) as caught:
        read_events(request(**changes), SPEC, source="request")
    message = str(caught.value)
    assert message.startswith(f"request, column '{field}': ")
    assert words in message
    bad_rows = {"amount": 2 if "negative" in words else 1, "balance": 3, "customer_id": 1,
                "event_type": 2}
    if field in bad_rows and "missing field" not in words:
        assert message.endswith(f"(first offending rows, 0-based: {bad_rows[field]})")


def test_cursors_name_one_consumer_and_positions_compare_as_numbers():
    batch = read_events(request(cursor=[b"w-1:9", b"w-1:10", b"", b"w-1:1719-2"]), SPEC)
    assert batch.consumer == "w-1"
    assert batch.positions.tolist() == ["", "10", "9", "1719-2"]  # in the events' order
    assert position_key("10") > position_key("9") and position_key("9-1") > position_key("9-0")
    assert position_key("1719828000000-12") > position_key("1719828000000-3")


def test_live_inputs_follow_the_spec_and_refuse_clashing_columns():
    assert [(f.name, f.kind, f.optional) for f in event_fields(SPEC)] == [
        ("customer_id", "text", False), ("timestamp", "text", False),
        ("event_type", "text", False), ("amount", "number", False),
        ("balance", "number", False), ("channel", "text", False), ("cursor", "text", True),
    ]
    clash = FeaturiserSpec(Vocab(("card",)), max_len=4, horizon_days=30.0,
                           numeric_features=("cursor",))
    with pytest.raises(ValueError, match=r"columns \['cursor'\] clash"):
        event_fields(clash)


def test_features_equal_the_batch_featuriser_on_the_same_table():
    table = pd.DataFrame({
        "customer_id": ["c1", "c1", "c2", "c3"],
        "timestamp": pd.to_datetime(["2024-07-01 10:00:00.25", "2024-07-01 12:00:00", "2024-07-01 10:00:00",
                                     "2024-07-02 00:00:00"], format="ISO8601"),
        "event_type": ["crypto", "salary", "card", "card"], "amount": [3.0, 2.0, 1.5, 0.0],
        "balance": [0.0, -5.0, 10.0, 1.0], "channel": ["branch", "atm", "app", "app"],
    })
    expected = SPEC.event_features(SPEC.read_events(table))
    got = read_events(request(), SPEC).features
    for name, values in expected.items():
        if name != "delta_t":  # the live delta is the gap since the stored last event
            np.testing.assert_array_equal(got[name], values, err_msg=name)


def test_json_lines_are_positioned_by_line_number():
    lines = ['{"customer_id": "a", "amount": 1}\n', "\n", "not json\n", "[1, 2]\n", '{"x": 2}\n']
    events = list(jsonl_events(lines))
    assert [(e.position, e.fields, e.error[:30]) for e in events] == [
        ("1", {"customer_id": "a", "amount": 1}, ""),
        ("3", None, "line 3: not JSON (Expecting va"),
        ("4", None, "line 4: expected a JSON object"),
        ("5", {"x": 2}, ""),
    ]
