"""`fintwin serve` notices a dead tritonserver or python stub, stops serving and exits 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fintwin.serving.server import STUB_NAME, free_ports, python_stubs

STARTUP_DEADLINE_S = 90
EXIT_DEADLINE_S = 30
WATCHING = "stop with Ctrl-C"  # what `fintwin serve` logs once it has seen the server ready


def _exe_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name
    except OSError:
        return ""


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


class ServeCommand:
    """A running `fintwin serve` process, its tritonserver and the python stubs of that server."""

    def __init__(self, repo: Path, log: Path, standin) -> None:
        self.standin = standin
        self.log = log
        self.http_port, grpc_port, metrics_port = free_ports("127.0.0.1", 3)
        ports = {"--http-port": self.http_port, "--grpc-port": grpc_port}
        ports["--metrics-port"] = metrics_port
        command = [sys.executable, "-m", "fintwin.cli", "serve", "--repo", str(repo)]
        command += [str(item) for flag_port in ports.items() for item in flag_port]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.server_pid = 0

    def wait_ready(self) -> None:
        """Until the server is ready and the command has seen it (its watchdog runs)."""
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline and self.process.poll() is None:
            if _ready(self.http_port) and WATCHING in self.log.read_text(errors="replace"):
                break
            time.sleep(0.2)
        assert _ready(self.http_port) and WATCHING in self.log.read_text(), self.output()
        (self.server_pid,) = [
            pid
            for pid in self.standin.children_of(self.process.pid)
            if _exe_name(pid) == "tritonserver"
        ]

    def output(self) -> str:
        """Everything the command printed; waits (bounded) for it to exit."""
        self.process.wait(timeout=EXIT_DEADLINE_S)
        return self.log.read_text(errors="replace")

    def server_group_is_gone(self) -> bool:
        """Whether tritonserver and its stubs have all exited (polled: dying takes a moment)."""
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while self.standin.processes_in_group(self.server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.standin.processes_in_group(self.server_pid) == []

    def kill_everything(self) -> None:
        for group in (self.process.pid, self.server_pid):
            if group and self.standin.processes_in_group(group):
                os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=EXIT_DEADLINE_S)


@pytest.fixture
def serve_command(model_repo, standin, tmp_path) -> Iterator[ServeCommand]:
    command = ServeCommand(model_repo, tmp_path / "serve.log", standin)
    try:
        command.wait_ready()
        yield command
    finally:
        command.kill_everything()
    assert command.server_group_is_gone()


def test_a_healthy_server_has_no_health_problem(triton_server, standin):
    stubs = python_stubs(triton_server.process.pid)

    assert list(stubs.values()) == [standin.model_name]
    assert all(_exe_name(pid) == STUB_NAME for pid in stubs)
    assert triton_server.stubs == stubs
    assert triton_server.stubs_expected == {standin.model_name: 1}
    assert triton_server.health_problem() is None


def test_a_stub_missing_once_ready_is_a_health_problem(triton_server, standin, monkeypatch):
    monkeypatch.setattr(triton_server, "stubs", {})  # as if one died before the server was ready

    problem = triton_server.health_problem()

    assert problem.startswith(f"a python backend stub of model '{standin.model_name}' died (0 of 1")


def test_serve_exits_1_when_a_python_stub_is_killed(serve_command, standin):
    ((stub, model),) = python_stubs(serve_command.server_pid).items()

    os.kill(stub, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    output = serve_command.output()

    assert serve_command.process.returncode == 1, output
    assert f"a python backend stub of model '{model}' died (0 of 1 left" in output
    assert "for a supervisor to restart it" in output
    assert not _ready(serve_command.http_port)
    assert serve_command.server_group_is_gone()


def test_serve_exits_1_when_tritonserver_is_killed(serve_command, standin):
    os.kill(serve_command.server_pid, signal.SIGKILL)
    output = serve_command.output()

    assert serve_command.process.returncode == 1, output
    assert "tritonserver was killed by signal 9 (SIGKILL)" in output
    assert not _ready(serve_command.http_port)
    assert serve_command.server_group_is_gone()  # its stubs too
