"""Integrity manifest of a model version: the SHA-256 of every file in its directory.

``fintwin export`` writes ``fintwin.sha256`` into each version directory (batch and live
models) as the version's last file, in ``sha256sum`` format, so ``sha256sum -c fintwin.sha256``
run in the version directory checks it by hand too. ``fintwin serve`` verifies every version
before serving and refuses one whose files changed, are missing or were added.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fintwin.errors import FintwinInputError
from fintwin.files import write_atomic

MANIFEST_NAME = "fintwin.sha256"
_LINE = re.compile(r"([0-9a-f]{64})  (\S.*)")


class IntegrityError(FintwinInputError):
    """A version's files differ from its manifest, or it has no readable manifest."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def version_files(version_dir: Path) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of every file under ``version_dir`` but the
    manifest."""
    version_dir = Path(version_dir)
    return sorted(
        path.relative_to(version_dir).as_posix()
        for path in version_dir.rglob("*")
        if not path.is_dir() and path.relative_to(version_dir).as_posix() != MANIFEST_NAME
    )


def write_manifest(version_dir: Path) -> None:
    """Record the SHA-256 of every file of ``version_dir`` in its manifest (atomically)."""
    version_dir = Path(version_dir)
    lines = [f"{file_sha256(version_dir / name)}  {name}\n" for name in version_files(version_dir)]
    write_atomic(version_dir / MANIFEST_NAME, "".join(lines).encode())


def read_manifest(version_dir: Path) -> dict[str, str]:
    """File name -> recorded SHA-256 of a version; IntegrityError when unreadable."""
    path = Path(version_dir) / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise IntegrityError(
            f"version {version_dir} has no integrity manifest {MANIFEST_NAME}, so its files "
            "cannot be verified: export the model again with `fintwin export`"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"cannot read the integrity manifest {path}: {exc}") from exc
    recorded = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise IntegrityError(
                f"{path} line {number}: expected '<64 hex digits>  <file name>', got {line[:80]!r}"
            )
        recorded[match.group(2)] = match.group(1)
    return recorded


def verify_version(version_dir: Path) -> None:
    """Refuse a version whose files differ from its manifest: changed, missing or extra files
    are named (IntegrityError)."""
    version_dir = Path(version_dir)
    recorded = read_manifest(version_dir)
    present = version_files(version_dir)
    changed = [
        name for name in present if name in recorded and file_sha256(version_dir / name) != recorded[name]
    ]
    missing = sorted(set(recorded) - set(present))
    extra = sorted(set(present) - set(recorded))
    problems = [
        f"{label} {', '.join(names)}"
        for label, names in (("changed:", changed), ("missing:", missing), ("not exported:", extra))
        if names
    ]
    if problems:
        raise IntegrityError(
            f"version {version_dir} differs from its integrity manifest {MANIFEST_NAME} "
            f"({'; '.join(problems)}): refusing to serve files that are not the exported ones; "
            "restore them or export the model again"
        )
