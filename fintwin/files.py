"""Atomic file writes: a reader sees the previous file or the complete new one, never a part.

Every file fintwin writes goes through a temporary file in the target's directory that is
flushed to disk and renamed over the target with ``os.replace``; the rename is flushed too
(the directory is synced). When writing fails, the temporary file is removed and the
previous file, if any, is left as it was. Missing parent directories are created.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # what a plain open() creates under the usual umask 022 (mkstemp: 0o600)


def sync_to_disk(path: str | Path) -> None:
    """Flush a file's contents, or a directory's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = FILE_MODE) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that takes a path (``DataFrame.to_parquet``,
    ``Figure.savefig``); on success it is flushed and renamed to ``path``, on failure removed.

    The temporary name keeps ``path``'s suffix, so writers that read the format from the
    suffix (``.csv.gz``, ``.png``) write the right one. The file gets permissions ``mode``
    (0o600 for a secret: the temporary file is created so, and stays so).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        sync_to_disk(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_to_disk(path.parent)


def write_atomic(
    path: str | Path, data: bytes | str | Iterable[bytes], mode: int = FILE_MODE
) -> None:
    """Write ``data`` to ``path`` atomically: bytes, text (UTF-8) or chunks of bytes (streamed,
    e.g. a copy of a large file), with permissions ``mode``."""
    if isinstance(data, str):
        data = data.encode()
    chunks = [data] if isinstance(data, bytes) else data
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as handle:
        handle.writelines(chunks)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON with sorted keys (and a final newline) atomically."""
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
