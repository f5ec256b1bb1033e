"""Pseudonymous customers: the store keys states by HMAC-SHA256 of the id, never the id, in
SQLite files and in a Redis server that requires a password and speaks TLS."""

from __future__ import annotations

import hashlib
import hmac
import stat
from pathlib import Path

import numpy as np
import pytest
import redis

from fintwin.errors import FintwinInputError
from fintwin.live.pseudonyms import KEY_ENV, KEY_FILE_ENV, CustomerKeys, configured_keys
from fintwin.live.store import (
    REDIS_PASSWORD_FILE_ENV,
    SQLiteStateStore,
    StateLayout,
    StateUpdate,
    open_store,
)
from fintwin.serving.certificates import write_development_pki

MODEL = "twin_live"
LAYOUT = StateLayout.of({"h": ((1, 8), "float32")})
T0 = 1_704_067_200_000_000_000
RAW_IDS = ["alice.smith@bank.example", "CUST-000042", "zoë"]


def write_states(store, ids=RAW_IDS) -> None:
    store.declare(MODEL, 1, LAYOUT)
    updates = [StateUpdate(cid, 1, T0, {"h": np.full((1, 8), i, np.float32)})
               for i, cid in enumerate(ids)]
    assert store.apply(MODEL, 1, updates).applied == (0, 1, 2)


def assert_no_raw_id(blob: bytes, where: str) -> None:
    for cid in RAW_IDS:
        assert cid.encode() not in blob, f"{where} holds the raw customer id {cid!r}"


def test_a_key_is_the_hmac_of_the_id() -> None:
    keys = CustomerKeys(b"s" * 32)
    assert keys.key("c1") == hmac.new(b"s" * 32, b"c1", hashlib.sha256).hexdigest()
    assert keys.key("c1") != CustomerKeys(b"t" * 32).key("c1") != keys.key("c2")
    assert "s" * 32 not in repr(keys)
    with pytest.raises(FintwinInputError, match="5 bytes; expected at least 16"):
        CustomerKeys(b"short")


def test_the_secret_comes_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "id.key"
    secret_file.write_text("file-secret-0123456789abcdef\n")
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(secret_file))
    assert configured_keys().key("c1") == CustomerKeys(b"file-secret-0123456789abcdef").key("c1")
    monkeypatch.setenv(KEY_ENV, "x" * 16)
    with pytest.raises(FintwinInputError, match=f"both {KEY_ENV} and {KEY_FILE_ENV} are set"):
        configured_keys()
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(FintwinInputError, match=r"missing.key: cannot read the secret"):
        configured_keys()


def test_sqlite_keeps_no_raw_id_and_its_own_secret_when_none_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV)
    path = tmp_path / "twins.db"
    with SQLiteStateStore(path) as store:
        write_states(store)
        keys = store.customer_keys
    secret = Path(f"{path}.key")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for file in tmp_path.iterdir():
        assert_no_raw_id(file.read_bytes(), file.name)
    with open_store(f"sqlite:///{path}") as reopened:  # the same secret: the same twins
        found = reopened.get(MODEL, 1, RAW_IDS)
        assert found.unknown == () and found.states["CUST-000042"].arrays["h"][0, 0] == 1.0
        assert reopened.customer_ids(MODEL, 1) == sorted(keys.keys(RAW_IDS))


def test_redis_needs_the_shared_secret(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(FintwinInputError, match=f"set {KEY_ENV} or {KEY_FILE_ENV}"):
        open_store(redis_url)


def test_redis_with_a_password_and_tls_keeps_no_raw_id(
    start_redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_redis(password="redis-test-password", pki=write_development_pki(tmp_path / "pki"))
    unauthenticated = server.url.replace(":redis-test-password@", "")
    password_file = tmp_path / "redis_password"
    password_file.write_text("redis-test-password\n")
    monkeypatch.setenv(REDIS_PASSWORD_FILE_ENV, str(password_file))
    with open_store(unauthenticated) as store:  # the password from the file, not the URL
        write_states(store)
        assert store.get(MODEL, 1, ["zoë"]).states["zoë"].arrays["h"][0, 0] == 2.0
    with redis.Redis.from_url(server.url) as client:
        for key in client.scan_iter(count=1000):
            assert_no_raw_id(key, "a Redis key")
            value = client.dump(key)
            assert_no_raw_id(value, f"the value of {key!r}")
    plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # no TLS: refused
    with redis.Redis.from_url(unauthenticated) as client, pytest.raises(
        redis.AuthenticationError
    ):
        client.ping()
