"""CSV files as spreadsheets and other systems write them: each quirk accepted or refused
with the line named."""

import gzip
from pathlib import Path

import pandas as pd
import pytest

from fintwin.cli import main
from fintwin.data.schema import EventSchema, EventValidationError
from fintwin.data.sources import load_events, sniff_csv
from fintwin.errors import FintwinInputError

HEADER = "customer_id,timestamp,event_type,amount"


def write(tmp_path, text: str, name: str = "events.csv", encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def load(tmp_path, text: str, schema: EventSchema | None = None, **kwargs) -> pd.DataFrame:
    return load_events(write(tmp_path, text, **kwargs), schema)[0]


def refuse(tmp_path, text: str, match: str, schema: EventSchema | None = None, **kwargs):
    with pytest.raises(FintwinInputError, match=match) as info:
        load(tmp_path, text, schema, **kwargs)
    return info.value


def test_semicolon_file_is_sniffed_and_summarised(tmp_path, capsys):
    path = write(tmp_path, 'customer_id;timestamp;event_type;amount\n'
                           '7;2024-03-01 10:00;buy;"1.234,50"\n8;2024-03-02;buy;12,5\n')
    assert main(["data", "summary", path]) == 0
    out = capsys.readouterr().out
    assert "2024-03-01" in out and "2024-03-02" in out  # the date range
    assert "12.50" in out and "1,234.50" in out  # the amount quantiles


def test_semicolon_file_missing_a_column_exits_2_naming_it(tmp_path, capsys):
    path = write(tmp_path, "customer_id;timestamp;event_type\n7;2024-03-01;buy\n")
    assert main(["data", "summary", path]) == 2
    err = capsys.readouterr().err
    assert "column 'amount': missing required column(s) ['amount']" in err
    assert "found ['customer_id', 'timestamp', 'event_type']" in err and "Traceback" not in err


@pytest.mark.parametrize("separator", [";", "\t", "|"])
def test_separators_are_sniffed_from_the_header(tmp_path, separator):
    path = write(tmp_path, HEADER.replace(",", separator) + "\n"
                 + separator.join(["a", "2024-01-01", "buy", "5"]) + "\n")
    assert sniff_csv(Path(path)).separator == separator
    events = load_events(path)[0]
    assert events.loc[0, "customer_id"] == "a" and events.loc[0, "amount"] == 5.0


def test_unread_separator_is_named(tmp_path):
    err = refuse(tmp_path, "customer_id timestamp event_type amount\na 2024-01-01 buy 5\n",
                 "missing required column")
    assert "the header looks ' '-separated (separators read: ',' ';' tab '|')" in str(err)


def test_excel_export_quirks_are_accepted(tmp_path):
    """BOM, CRLF, padded mixed-case header, trailing empty columns, blank lines."""
    text = ("\ufeff Customer_ID ;TIMESTAMP; Event_Type;Amount;;\r\n"
            "007;31/12/2024 13:45;buy;1.234,50;;\r\n"
            "\r\n"
            ";;;;;\r\n"
            "008 ;02/01/2025 08:00; card ;7;;\r\n")
    events = load(tmp_path, text)
    assert events["customer_id"].tolist() == ["007", "008"]
    assert events["event_type"].tolist() == ["buy", "card"]
    assert events["timestamp"].tolist() == [pd.Timestamp("2024-12-31 13:45"), pd.Timestamp("2025-01-02 08:00")]
    assert events["amount"].tolist() == [1234.5, 7.0]


def test_utf16_tab_text_from_excel(tmp_path):
    text = "\ufeffcustomer_id\ttimestamp\tevent_type\tamount\r\na\t12/31/2024 1:45 PM\tbuy\t1,5\r\n"
    events = load(tmp_path, text, name="events.txt", encoding="utf-16-le")
    assert events.loc[0, "timestamp"] == pd.Timestamp("2024-12-31 13:45") and events.loc[0, "amount"] == 1.5


def test_gzipped_semicolon_file(tmp_path):
    path = tmp_path / "events.csv.gz"
    path.write_bytes(gzip.compress(b"customer_id;timestamp;event_type;amount\na;2024-01-01;buy;2,5\n"))
    assert load_events(str(path))[0]["amount"].tolist() == [2.5]


def test_non_utf8_file_names_the_line(tmp_path):
    text = HEADER + "\na,2024-01-01,buy,1\nb,2024-01-02,caf\u00e9,2\n"
    refuse(tmp_path, text, r"line 3 is not UTF-8 text \(byte b'\\xe9'\); expected UTF-8", encoding="latin-1")


def test_quoted_thousands_in_a_comma_file(tmp_path):
    events = load(tmp_path, HEADER + '\na,2024-01-01,buy,"1,234.50"\na,2024-01-02,buy,"1,000"\n')
    assert events["amount"].tolist() == [1234.5, 1000.0]


@pytest.mark.parametrize("row", ["a,2024-01-02,buy,1,234.50", "a,2024-01-02,buy,1,234,567.50"])
def test_unquoted_separator_in_a_value_names_the_line(tmp_path, row):
    err = refuse(tmp_path, f"{HEADER}\na,2024-01-01,buy,5\n{row}\n", "must be quoted")
    assert "line 3" in str(err) or "lines: 3" in str(err)


def test_trailing_separators_on_rows_only(tmp_path):
    events = load(tmp_path, HEADER + "\na,2024-01-01,buy,5,\na,2024-01-02,buy,6,\n")
    assert events["amount"].tolist() == [5.0, 6.0]


def test_ambiguous_decimal_comma_names_the_line_unless_declared(tmp_path):
    text = "customer_id;timestamp;event_type;amount\na;2024-01-01;buy;5\na;2024-01-02;buy;1,234\n"
    err = refuse(tmp_path, text, "ambiguous number '1,234': a thousands separator or a decimal comma")
    assert err.rows == [3] and "first offending lines: 3" in str(err)
    assert load(tmp_path, text, EventSchema(decimal=","))["amount"].tolist() == [5.0, 1.234]
    assert load(tmp_path, text, EventSchema(decimal="."))["amount"].tolist() == [5.0, 1234.0]


def test_mixed_decimal_marks_refused(tmp_path):
    text = 'customer_id;timestamp;event_type;amount\na;2024-01-01;buy;1.234,50\na;2024-01-02;buy;1,234.50\n'
    err = refuse(tmp_path, text, "mixed decimal marks")
    assert err.rows == [2, 3]


def test_month_first_and_day_first_dates_read_from_the_values(tmp_path):
    month_first = load(tmp_path, HEADER + "\na,12/31/2024 13:45,buy,1\na,01/02/2025,buy,1\n")
    assert month_first["timestamp"].tolist() == [pd.Timestamp("2024-12-31 13:45"), pd.Timestamp("2025-01-02")]
    day_first = load(tmp_path, HEADER + "\na,31.12.2024 13:45,buy,1\na,01.02.2025,buy,1\n")
    assert day_first["timestamp"].tolist()[1] == pd.Timestamp("2025-02-01")


def test_ambiguous_dates_refused_naming_the_line_or_resolved_explicitly(tmp_path, capsys):
    text = HEADER + "\n\na,01/02/2025,buy,1\na,03/04/2025,buy,1\n"
    err = refuse(tmp_path, text, "ambiguous numeric date '01/02/2025'")
    assert err.rows == [3, 4] and "--day-first or --month-first" in str(err)
    assert load(tmp_path, text, EventSchema(day_first=True))["timestamp"].tolist() == [
        pd.Timestamp("2025-02-01"), pd.Timestamp("2025-04-03")]
    assert main(["data", "summary", write(tmp_path, text), "--month-first"]) == 0
    out = capsys.readouterr().out
    assert "2025-01-02" in out and "2025-03-04" in out  # the date range, read month first


def test_mixed_date_orders_refused(tmp_path):
    err = refuse(tmp_path, HEADER + "\na,31/01/2025,buy,1\na,01/31/2025,buy,1\n",
                 "numeric dates mix orders")
    assert err.rows == [2, 3]


@pytest.mark.parametrize("text", [HEADER + "\na,45292.5,buy,1\na,45293,buy,1\n",
                                  "customer_id;timestamp;event_type;amount\na;45292,5;buy;1\na;45293;buy;1\n"])
def test_excel_serial_day_numbers(tmp_path, text):
    events = load(tmp_path, text)
    assert events["timestamp"].tolist() == [pd.Timestamp("2024-01-01 12:00"), pd.Timestamp("2024-01-02")]


def test_epoch_seconds_are_not_excel_serials(tmp_path):
    err = refuse(tmp_path, HEADER + "\na,45292,buy,1\na,1704067200,buy,1\n",
                 "number 1704067200.0 is no timestamp: numbers are read as Excel serial day numbers")
    assert err.rows == [3]


def test_mixed_offsets_become_naive_utc(tmp_path):
    events = load(tmp_path, HEADER + "\na,2024-01-01T10:00:00+02:00,buy,1\na,2024-01-01T10:00:00-05:00,buy,1"
                                     "\na,2024-01-01 09:30Z,buy,1\n")
    assert events["timestamp"].tolist() == [pd.Timestamp("2024-01-01 08:00"), pd.Timestamp("2024-01-01 09:30"),
                                            pd.Timestamp("2024-01-01 15:00")]


def test_aware_mixed_with_naive_names_the_line(tmp_path):
    err = refuse(tmp_path, HEADER + "\na,2024-01-01T10:00:00,buy,1\na,2024-01-02T10:00:00+02:00,buy,1"
                                    "\na,2024-01-03,buy,1\n", "timezone-aware and naive timestamps mixed")
    assert err.rows == [3]


def test_trailing_total_row_names_the_line(tmp_path):
    err = refuse(tmp_path, "customer_id;timestamp;event_type;amount\na;2024-01-01;buy;5\n\nTotal;;;5\n",
                 r"column 'customer_id': a total row \('Total' without a timestamp\)")
    assert err.rows == [4]


def test_error_rows_are_file_lines_counting_blank_lines(tmp_path):
    err = refuse(tmp_path, HEADER + "\na,2024-01-01,buy,1\n\n\nb,2024-01-02,buy,ten\n", "non-numeric value 'ten'")
    assert isinstance(err, EventValidationError) and err.rows == [5]


def test_two_columns_naming_one_contract_column(tmp_path):
    refuse(tmp_path, "customer_id,amount,timestamp,event_type,Amount \na,1,2024-01-01,buy,2\n",
           "columns 'amount' and 'Amount ' both name 'amount'; keep one")


@pytest.mark.parametrize("text, match", [("", "empty file"), ("\r\n\r\n", "empty file"),
                                         (HEADER + "\r\n\r\n", "empty input: no event rows")])
def test_empty_files(tmp_path, text, match):
    refuse(tmp_path, text, match)


def test_value_under_an_empty_header_cell_names_the_line(tmp_path):
    err = refuse(tmp_path, HEADER + ",,\na,2024-01-01,buy,5,,\na,2024-01-02,buy,1,234.50,\n",
                 r"a value under no column name \('234.50'\); a value holding the separator ','")
    assert err.rows == [3]
