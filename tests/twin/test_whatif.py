"""What-if scenarios: injected events, common random numbers, input checks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from fintwin.errors import FintwinInputError
from fintwin.twin.rollout import RolloutConfig, mean_numeric
from fintwin.twin.whatif import (
    check_what_if,
    inject_history,
    read_what_if,
    resolve_what_if,
    what_if,
)
from tests.twin.conftest import (
    CUTOFF,
    SPEC,
    START,
    KnownHeads,
    build_twin,
    fix_heads,
    history_events,
    window_days,
)

HORIZON_END = "2024-04-30"
HEADS = KnownHeads(gap_median=5.0, gap_sigma=0.5, p_dormant=0.5)
DIFF_COLUMNS = [f"diff_{name}" for name in ("expected_count", "expected_spend", "p_active")]


@pytest.fixture(scope="module")
def model():
    return fix_heads(build_twin(), HEADS)


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    """c0 has been silent for 150 days (surely dormant under HEADS), c1 for one day."""
    return history_events([150.0, 1.0])


def injections(*rows: tuple[str, str, str, float]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["customer_id", "timestamp", "event_type", "amount"])
    return check_what_if(frame, SPEC)


def survival(days: float) -> float:
    return norm.sf((math.log(days) - math.log(HEADS.gap_median)) / HEADS.gap_sigma)


def run(model, events, rows, samples=2000, **config) -> object:
    return what_if(
        model, events, SPEC, CUTOFF, HORIZON_END, rows, RolloutConfig(samples=samples, **config)
    )


def test_event_before_the_cutoff_revives_a_dormant_customer(model, events) -> None:
    result = run(model, events, injections(("c0", "2024-03-31 12:00", "card", 30.0)))
    dormant, other = result.per_customer.loc["c0"], result.per_customer.loc["c1"]
    assert dormant["base_expected_count"] == 0.0
    assert dormant["diff_expected_count"] > 5 * dormant["diff_expected_count_se"] > 0
    c, p = 0.5, HEADS.p_dormant  # the injected event is now the last one, 12 hours ago
    window = window_days(HORIZON_END)
    active = (1 - p) * (survival(c) - survival(c + window)) / (p + (1 - p) * survival(c))
    assert abs(dormant["diff_p_active"] - active) < 3 * dormant["diff_p_active_se"]
    assert (other[DIFF_COLUMNS] == 0.0).all()  # common random numbers: identical paths
    assert other["base_expected_count"] > 0
    assert result.overall["diff_expected_count"] == pytest.approx(dormant["diff_expected_count"])
    assert result.overall["customers_with_injections"] == 1.0
    assert result.per_customer["injected_events"].tolist() == [1, 0]


def test_future_event_is_forced_into_every_path(model, events) -> None:
    rows = injections(("c0", "2024-04-11", "salary", 1000.0))
    result = run(model, events, rows, samples=1000, keep_paths=True)
    paths = result.paths[result.paths["customer_id"] == "c0"]
    forced = paths[paths["injected"]]
    assert len(forced) == 1000 and (forced["timestamp"] == pd.Timestamp("2024-04-11")).all()
    assert (forced["event_type"] == "salary").all() and (forced["amount"] == 1000.0).all()
    generated = paths[~paths["injected"]]
    assert (generated["timestamp"] > pd.Timestamp("2024-04-11")).all()  # c0 was dormant before
    row = result.per_customer.loc["c0"]
    # after the forced event on day 10: not dormant, then a gap shorter than the 20 days left
    active = (1 - HEADS.p_dormant) * (1 - survival(window_days(HORIZON_END) - 10))
    assert abs(row["diff_p_active"] - active) < 3 * row["diff_p_active_se"]
    assert row["diff_expected_spend"] == pytest.approx(
        row["diff_expected_count"] * HEADS.amount_mean, rel=0.15
    )


def test_empty_what_if_changes_nothing(model, events) -> None:
    result = run(model, events, injections(), samples=300)
    assert (result.per_customer[DIFF_COLUMNS] == 0.0).all().all()
    assert (result.per_customer[[f"{c}_se" for c in DIFF_COLUMNS]] == 0.0).all().all()
    assert result.overall["diff_expected_count"] == 0.0
    assert result.overall["diff_active_customers"] == 0.0
    assert result.overall["injected_events"] == 0.0


def test_star_injects_for_every_customer(model, events) -> None:
    result = run(model, events, injections(("*", "2024-04-01", "card", 5.0)), samples=300)
    assert result.per_customer["injected_events"].tolist() == [1, 1]
    assert result.overall["injected_events"] == 2.0
    assert result.per_customer.loc["c0", "diff_expected_count"] > 0


def test_read_what_if_file(tmp_path: Path) -> None:
    path = tmp_path / "what_if.csv"
    path.write_text("customer_id,timestamp,event_type,amount\n007,2024-04-02,card,3.5\n")
    rows = read_what_if(path, SPEC)
    assert rows.loc[2, "customer_id"] == "007"  # ids stay strings; rows are named by file line
    assert rows.loc[2, "timestamp"] == pd.Timestamp("2024-04-02")
    assert rows["row"].tolist() == [2]
    bad = tmp_path / "what_if.txt"
    bad.write_text("")
    with pytest.raises(FintwinInputError, match="unsupported what-if file type"):
        read_what_if(bad, SPEC)
    with pytest.raises(FintwinInputError, match="not found"):
        read_what_if(tmp_path / "missing.csv", SPEC)


def test_what_if_file_is_read_as_event_files_are(tmp_path: Path) -> None:
    """';' separators, padded mixed-case headers, decimal commas with thousands separators,
    day-first dates and an optional numeric feature, as in a spreadsheet export."""
    spec = dataclasses.replace(SPEC, numeric_features=("balance",))
    path = tmp_path / "what_if.csv"
    path.write_text(
        "\ufeff Customer_ID ;Timestamp;Event_Type;Amount;Balance\r\n"
        "c1;15.04.2024 13:45;card;1.234,50;\r\n"
        "\r\n"
        "*;02.04.2024;salary;2500,00;10,5\r\n"
    )
    rows = read_what_if(path, spec)
    assert rows["row"].tolist() == [2, 4]  # file lines
    assert rows["customer_id"].tolist() == ["c1", "*"]
    assert rows["timestamp"].tolist() == [
        pd.Timestamp("2024-04-15 13:45"),
        pd.Timestamp("2024-04-02"),
    ]
    assert rows["amount"].tolist() == [1234.5, 2500.0]
    np.testing.assert_array_equal(rows["balance"], [np.nan, 10.5])


def test_what_if_parquet_ids_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "what_if.parquet"
    pd.DataFrame(
        {"CUSTOMER_ID": [7], "timestamp": [pd.Timestamp("2024-04-02")], "event_type": ["card"],
         "amount": [3]}
    ).to_parquet(path)
    rows = read_what_if(path, SPEC)
    assert rows[["customer_id", "amount", "row"]].values.tolist() == [["7", 3.0, 0]]


def test_bad_timestamp_in_a_file_is_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "what_if.csv"
    path.write_text(
        "customer_id,timestamp,event_type,amount\n"
        "c0,2024-04-02,card,1\n"
        "\n"
        "c1,2024-04-31,card,1\n"
    )
    with pytest.raises(FintwinInputError) as error:
        read_what_if(path, SPEC)
    assert str(error.value).startswith(f"{path}, column 'timestamp': unparseable timestamp '2024-04-31'")
    assert str(error.value).endswith("(first offending lines: 4)")


def test_unknown_customer_in_a_file_is_named_by_line(events, tmp_path: Path) -> None:
    path = tmp_path / "what_if.csv"
    path.write_text(
        "customer_id;timestamp;event_type;amount\n*;2024-04-03;card;1,5\nzz;2024-04-03;card;1\n"
    )
    rows = read_what_if(path, SPEC)
    with pytest.raises(FintwinInputError) as error:
        resolve_what_if(rows, SPEC.sequences(events, CUTOFF), HORIZON_END, source=str(path))
    assert str(error.value) == (
        f"{path}, column 'customer_id': unknown customer_id(s) ['zz']; what-if customers need "
        "calibration events before the cut-off (first offending lines: 3)"
    )


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (("c1", "2024-04-02", "loan", 1.0), ["rows, 0-based: 1", "unknown event_type 'loan'", "card"]),
        (("c1", "2024-04-02", "card", -1.0), ["column 'amount'", "rows, 0-based: 1"]),
        (("c1", "not a date", "card", 1.0), ["column 'timestamp'", "rows, 0-based: 1"]),
        ((" ", "2024-04-02", "card", 1.0), ["column 'customer_id'", "'*' for every customer"]),
    ],
)
def test_bad_rows_are_named(row: tuple, words: list[str]) -> None:
    with pytest.raises(FintwinInputError) as error:
        injections(("c0", "2024-04-02", "card", 1.0), row)
    for word in words:
        assert word in str(error.value)


def test_missing_column_is_named() -> None:
    frame = pd.DataFrame({"customer_id": ["c0"], "timestamp": ["2024-04-02"], "amount": [1.0]})
    with pytest.raises(FintwinInputError, match=r"missing required column\(s\) \['event_type'\]"):
        check_what_if(frame, SPEC)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (("zz", "2024-04-02", "card", 1.0), ["unknown customer_id(s) ['zz']", "0-based: 1)"]),
        (("c1", "2024-03-30", "card", 1.0), ["0-based: 1)", "not after customer c1's last event"]),
        (("c1", "2024-05-01", "card", 1.0), ["0-based: 1)", "after the horizon end (2024-04-30"]),
    ],
)
def test_bad_customers_and_times_are_refused(events, row: tuple, words: list[str]) -> None:
    sequences = SPEC.sequences(events, CUTOFF)
    rows = injections(("c0", "2024-04-02", "card", 1.0), row)
    with pytest.raises(FintwinInputError) as error:
        resolve_what_if(rows, sequences, HORIZON_END)
    for word in words:
        assert word in str(error.value)


def test_star_rows_expand_in_customer_order(events) -> None:
    sequences = SPEC.sequences(events, CUTOFF)
    rows = resolve_what_if(injections(("*", "2024-04-03", "card", 1.0)), sequences, HORIZON_END)
    assert rows["customer_id"].tolist() == ["c0", "c1"]
    assert rows["customer"].tolist() == [0, 1]
    assert (rows["timestamp"] > START).all() and np.all(rows["row"] == 0)


def test_numeric_features_take_the_customer_mean_when_missing(events) -> None:
    spec = dataclasses.replace(SPEC, numeric_features=("balance",))
    events = events.assign(balance=[1.0, 2.0, 6.0, 10.0, 20.0, 30.0])
    rows = check_what_if(
        pd.DataFrame(
            {
                "customer_id": ["c1", "c1"],
                "timestamp": ["2024-03-31 12:00", "2024-04-05"],
                "event_type": ["card", "card"],
                "amount": [1.0, 2.0],
                "balance": [None, 99.0],
            }
        ),
        spec,
    )
    rows = resolve_what_if(rows, spec.sequences(events, CUTOFF), HORIZON_END)
    injected = inject_history(events, rows.iloc[:1], spec, CUTOFF)
    assert injected.loc[injected["customer_id"] == "c1", "balance"].tolist() == [
        10.0,
        20.0,
        30.0,
        20.0,
    ]
    batch = spec.sequences(injected, CUTOFF).batch(np.arange(2), with_targets=False)
    np.testing.assert_allclose(mean_numeric(batch)[:, 0].numpy(), [3.0, 20.0])

    model = fix_heads(build_twin(n_numeric=1), HEADS)
    result = what_if(model, events, spec, CUTOFF, HORIZON_END, rows, RolloutConfig(samples=50))
    assert result.per_customer.loc["c1", "injected_events"] == 2
    assert result.per_customer.loc["c0", "diff_expected_count"] == 0.0
