"""Pseudonymous customers: live state is keyed by a keyed hash of the customer id, never the id.

A customer's key in the state store (and in whatever is derived from it: alerts, metrics labels,
logs) is ``HMAC-SHA256(secret, customer id)`` in hex. Without the secret nobody can tell which
customer a key belongs to, nor test a guessed id; with it, an application that knows a customer's
id finds its twin (``fintwin live get ID`` hashes the id it is given).

The secret comes from the environment, never from a config file or a command line:
``FINTWIN_ID_KEY`` (the secret itself) or ``FINTWIN_ID_KEY_FILE`` (a file holding it). Without
either, an embedded SQLite store keeps its own secret in ``<database>.key`` next to it (created
once with mode 0600, 32 random bytes); a shared store (Redis) refuses to open, since every
server and worker must hash alike.

Rotating the secret re-keys every customer, and a keyed hash cannot be undone: export the model
again (a new version keeps its states apart), bootstrap the new version's states from the
history under the new secret (``fintwin live bootstrap``), switch the writers over, then delete
the old version's states.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from fintwin.errors import FintwinInputError

KEY_ENV = "FINTWIN_ID_KEY"
KEY_FILE_ENV = "FINTWIN_ID_KEY_FILE"
KEY_SUFFIX = ".key"
GENERATED_BYTES = 32
MIN_SECRET_BYTES = 16
FILE_MODE = 0o600


class CustomerKeys:
    """Customer id -> its pseudonymous key: HMAC-SHA256 of the id under a secret, in hex."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise FintwinInputError(
                f"customer id secret: {len(secret)} bytes; expected at least {MIN_SECRET_BYTES} "
                f"(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )
        self._secret = secret

    def key(self, customer_id: str) -> str:
        """The pseudonymous key of ``customer_id``."""
        return hmac.new(self._secret, customer_id.encode(), hashlib.sha256).hexdigest()

    def keys(self, customer_ids: Iterable[str]) -> list[str]:
        return [self.key(customer_id) for customer_id in customer_ids]

    def __repr__(self) -> str:  # never shows the secret
        return "CustomerKeys(HMAC-SHA256)"


def configured_keys() -> CustomerKeys | None:
    """The secret named by ``FINTWIN_ID_KEY`` or ``FINTWIN_ID_KEY_FILE``, None when unset."""
    secret = os.environ.get(KEY_ENV, "")
    path = os.environ.get(KEY_FILE_ENV, "")
    if secret and path:
        raise FintwinInputError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; expected one")
    if path:
        return CustomerKeys(read_secret(Path(path), KEY_FILE_ENV))
    return CustomerKeys(secret.encode()) if secret else None


def read_secret(path: Path, what: str) -> bytes:
    """A secret file's content (surrounding whitespace removed)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise FintwinInputError(f"{what} {path}: cannot read the secret ({exc.strerror})") from exc
    if not secret:
        raise FintwinInputError(f"{what} {path}: the file is empty; expected a secret")
    return secret


def local_keys(database: Path) -> CustomerKeys:
    """The configured secret, else the embedded store's own ``<database>.key`` (made once)."""
    configured = configured_keys()
    if configured is not None:
        return configured
    path = Path(str(database) + KEY_SUFFIX)
    if not path.exists():
        _create_secret_file(path)
    return CustomerKeys(read_secret(path, "customer id secret"))


def _create_secret_file(path: Path) -> None:
    """A new random secret at ``path`` (mode 0600), whole or not at all: written aside, then
    linked into place, so a concurrent creator's secret wins and nobody reads half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(GENERATED_BYTES))
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    finally:
        aside.unlink()


def shared_keys(where: str) -> CustomerKeys:
    """The configured secret; a shared store cannot do without one."""
    configured = configured_keys()
    if configured is None:
        raise FintwinInputError(
            f"state store {where}: customers are keyed by HMAC-SHA256 of their ids; set "
            f"{KEY_ENV} or {KEY_FILE_ENV} to the secret every server and worker shares"
        )
    return configured
