"""Live-path fixtures: a real redis-server on a free loopback port, and a state store URL
for each backend (``store_url``: SQLite file, or the shared Redis server emptied first).

Redis servers run from Debian's ``redis-server`` in a temporary directory and are always
stopped (SIGTERM, then SIGKILL) with their process reaped; tests skip, saying why, when the
binary is not installed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from fintwin.live.pseudonyms import KEY_ENV, KEY_FILE_ENV
from fintwin.serving.certificates import Pki
from fintwin.serving.server import free_ports

REDIS_SERVER = Path("/usr/bin/redis-server")
TEST_ID_SECRET = "live-tests-customer-id-secret-0123456789"
HOST = "127.0.0.1"
STARTUP_POLLS = 400  # x 0.05 s
STOP_TIMEOUT_S = 10


@pytest.fixture(autouse=True, scope="session")
def customer_id_secret() -> Iterator[str]:
    """The secret customers are keyed with (``fintwin.live.pseudonyms``), in the environment
    of the tests and of the servers they start, as a deployment sets it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, TEST_ID_SECRET)
        patch.delenv(KEY_FILE_ENV, raising=False)
        yield TEST_ID_SECRET


class RedisServer:
    """One redis-server process bound to 127.0.0.1, its data and log in ``directory``.

    ``appendonly``: log every write to an append-only file fsynced before the reply
    (``appendfsync always``), so a killed and restarted server keeps every acknowledged write;
    without it the server keeps nothing on disk.
    """

    def __init__(self, directory: Path, appendonly: bool = False, password: str = "",
                 pki: Pki | None = None) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.password, self.pki = password, pki
        self.port = free_ports(HOST, 1)[0]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://`` or, with TLS, ``rediss://`` (verifying the server against the test CA),
        with the password when the server requires one."""
        credentials = f":{self.password}@" if self.password else ""
        if self.pki is None:
            return f"redis://{credentials}{HOST}:{self.port}/0"
        return f"rediss://{credentials}{HOST}:{self.port}/0?ssl_ca_certs={self.pki.ca}"

    def _security_options(self) -> list[str]:
        options = ["--requirepass", self.password] if self.password else []
        if self.pki is not None:
            options += ["--port", "0", "--tls-port", str(self.port),
                        "--tls-cert-file", str(self.pki.server_cert),
                        "--tls-key-file", str(self.pki.server_key),
                        "--tls-ca-cert-file", str(self.pki.ca), "--tls-auth-clients", "no"]
        return options

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.appendonly
            else ["--appendonly", "no"]
        )
        command = [
            str(REDIS_SERVER),
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--save",
            "",
            *persistence,
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            *self._security_options(),
        ]
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            for _ in range(STARTUP_POLLS):
                if self.process.poll() is not None:
                    break
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        log_text = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING:\n{log_text}")

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save) and reap it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL it if it has not exited in time, and reap it."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def require_redis_server() -> None:
    if not REDIS_SERVER.exists():
        pytest.skip(f"{REDIS_SERVER} is not installed (apt-get install redis-server)")


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers of one test (``start_redis(appendonly=True)``, with a password
    and TLS: ``start_redis(password="...", pki=write_development_pki(...))``); all are stopped when the
    test ends."""
    require_redis_server()
    servers: list[RedisServer] = []

    def start(appendonly: bool = False, password: str = "",
              pki: Pki | None = None) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        servers.append(RedisServer(directory, appendonly, password, pki))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server without persistence, shared by the whole test run."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared redis-server's URL, emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty state store of each backend: ``sqlite:///...`` or ``redis://...``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'twins.db'}"
    return request.getfixturevalue("redis_url")
