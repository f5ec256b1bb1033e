import pandas as pd

from fintwin.cli import main


def test_data_summary_cdnow_sample(capsys):
    assert main(["data", "summary", "cdnow_sample"]) == 0
    out = capsys.readouterr().out
    assert "2,357" in out and "6,919" in out and "purchase 100.0%" in out


def test_data_summary_bad_file_exits_2(tmp_path, capsys):
    path = tmp_path / "events.csv"
    pd.DataFrame({"customer_id": [1, 2], "timestamp": ["2024-01-01", "2024-01-02"],
                  "event_type": ["a", "b"], "amount": [1.0, float("nan")]}).to_csv(path, index=False)
    assert main(["data", "summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert "events.csv, column 'amount': NaN or infinite value" in err and "Traceback" not in err


def test_data_summary_missing_source_exits_2(capsys):
    assert main(["data", "summary", "nowhere.parquet"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
