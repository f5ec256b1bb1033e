"""Atomic writes: the previous file or the complete new one, never a part, nothing left over."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from matplotlib.figure import Figure

from fintwin.files import atomic_path, write_atomic, write_json_atomic
from fintwin.twin.pipeline import write_parquet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_atomic_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.html"
    write_atomic(path, "<p>old</p>")
    write_atomic(path, "<p>n\u00e9w</p>")
    write_atomic(tmp_path / "out" / "data.bin", [b"ab", b"", b"cd"])

    assert path.read_bytes() == "<p>n\u00e9w</p>".encode()
    assert (tmp_path / "out" / "data.bin").read_bytes() == b"abcd"
    assert _names(tmp_path / "out") == ["data.bin", "report.html"]
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_write_json_atomic_sorts_keys(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"b": 1.5, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1.5\n}\n'


def test_a_write_failing_midway_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"loss": 1.0})

    def chunks():
        yield b'{"loss": 0.'
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(path, chunks())
    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert _names(tmp_path) == ["metrics.json"]


def test_a_failing_to_parquet_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "forecasts.parquet"
    write_parquet(pd.DataFrame({"customer_id": ["a"], "spend": [1.0]}), path)
    unconvertible = pd.DataFrame({"customer_id": ["b", 2], "spend": [2.0, 3.0]})

    with pytest.raises(pa.ArrowTypeError, match="customer_id"):
        write_parquet(unconvertible, path)
    assert pd.read_parquet(path).to_dict("list") == {"customer_id": ["a"], "spend": [1.0]}
    assert _names(tmp_path) == ["forecasts.parquet"]


def test_atomic_path_keeps_the_suffix_for_writers_that_read_it(tmp_path: Path) -> None:
    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    with atomic_path(tmp_path / "plots" / "tracking.png") as tmp:
        assert tmp.parent == tmp_path / "plots" and tmp.suffix == ".png"
        fig.savefig(tmp)
    assert (tmp_path / "plots" / "tracking.png").read_bytes().startswith(PNG_MAGIC)
    assert _names(tmp_path / "plots") == ["tracking.png"]


def test_atomic_path_removes_the_temporary_file_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "trials.csv") as tmp:
        tmp.write_text("trial,loss\n1,")
        raise KeyboardInterrupt
    assert _names(tmp_path) == []
