"""Embedded Triton: serve an exported model repository with nvidia-pytriton's tritonserver.

The bundled binary has only the python backend, so the exported (production, onnxruntime
backend) repository is not served as is: at start-up a RUNTIME repository is derived from it in a
temporary directory. Each model gets a python-backend config mirroring the production one (same
inputs/outputs, max_batch_size, dynamic_batching, version policy; CPU instances) and each
version directory holds ``model.py`` (fintwin/serving/python_model.py) next to a symlink to the
SAME ``model.onnx`` (and ``fintwin.json``) of the exported version. Production uses the
official tritonserver image instead (serve/docker-compose.yml), which runs the exported
repository directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from fintwin.errors import FintwinInputError
from fintwin.export.integrity import verify_version, version_files
from fintwin.export.triton_repo import (
    CONFIG_NAME,
    METADATA_NAME,
    MODEL_FILENAME,
    ModelRepositoryError,
    format_model_config,
    model_versions,
    read_model_config,
)
from fintwin.serving.security import AccessControl, ServerTls, without_keys

logger = logging.getLogger(__name__)

PYTHON_MODEL_SOURCE = Path(__file__).with_name("python_model.py")
INTRA_OP_THREADS_PARAMETER = "intra_op_threads"
SHARED_MEMORY_DIR = Path("/dev/shm")
LOG_ERROR_LINE = re.compile(r"E\d{4} ")  # glog prefix of Triton's error-level lines
STUB_NAME = "triton_python_backend_stub"
HEALTH_CHECK_INTERVAL_S = 0.5
BROKEN_SERVER_STOP_TIMEOUT_S = 2.0
_PR_SET_PDEATHSIG = 1
LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({LOOPBACK, "localhost", "::1"})


class ServerError(RuntimeError):
    """tritonserver could not be started, or stopped unexpectedly."""


def build_runtime_repository(repo: Path, dest: Path, *, intra_op_threads: int = 1) -> list[str]:
    """Derive a python-backend repository in ``dest`` from the exported ``repo``.

    Returns the model names. Every numeric version is checked against its integrity manifest
    (``fintwin.export.integrity``) and linked; the config's version policy decides which ones
    the server loads. Models that are python-backend models already (the live models,
    ``fintwin.live.repository``) are served as exported, each file of a version linked into a
    directory of the runtime repository: what the python backend writes next to ``model.py``
    (``__pycache__``) stays there, out of the verified exported version.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelRepositoryError(f"model repository {repo} does not exist")
    model_dirs = sorted(p for p in repo.iterdir() if (p / CONFIG_NAME).is_file())
    if not model_dirs:
        raise ModelRepositoryError(f"model repository {repo} holds no model (no */{CONFIG_NAME})")
    for model_dir in model_dirs:
        versions = model_versions(model_dir)
        if not versions:
            raise ModelRepositoryError(f"model {model_dir} has no numeric version directory")
        for version in versions:
            verify_version(model_dir / str(version))
        production = read_model_config(model_dir / CONFIG_NAME)
        if production.backend == "python":  # the live model: served as it is exported
            (dest / model_dir.name).mkdir(parents=True)
            (dest / model_dir.name / CONFIG_NAME).symlink_to((model_dir / CONFIG_NAME).resolve())
            for version in versions:
                _link_files(model_dir / str(version), dest / model_dir.name / str(version))
            continue
        config = runtime_config(production, intra_op_threads)
        (dest / model_dir.name).mkdir(parents=True)
        (dest / model_dir.name / CONFIG_NAME).write_text(format_model_config(config))
        for version in versions:
            _link_version(model_dir / str(version), dest / model_dir.name / str(version))
    return [p.name for p in model_dirs]


def runtime_config(production: mc.ModelConfig, intra_op_threads: int = 1) -> mc.ModelConfig:
    """Python-backend twin of a production config: same I/O and batching, CPU instances.

    Inputs with a dynamic (sequence) axis allow ragged batches: Triton's batcher then groups
    requests of different lengths too, and model.py pads them into one onnxruntime run. (The
    production onnxruntime backend would concatenate ragged inputs flat, so it batches only
    requests of equal length.)
    """
    config = mc.ModelConfig()
    config.CopyFrom(production)
    for tensor in config.input:
        tensor.allow_ragged_batch = -1 in tensor.dims
    config.ClearField("platform")
    config.ClearField("default_model_filename")
    config.ClearField("optimization")  # onnxruntime accelerators mean nothing to the python backend
    config.backend = "python"
    instances = sum(group.count or 1 for group in production.instance_group) or 1
    del config.instance_group[:]
    config.instance_group.append(
        mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    )
    config.parameters[INTRA_OP_THREADS_PARAMETER].string_value = str(intra_op_threads)
    return config


def _link_files(source: Path, dest: Path) -> None:
    """A directory ``dest`` holding a symlink to each file of the version ``source``."""
    for name in version_files(source):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).symlink_to((source / name).resolve())


def _link_version(source: Path, dest: Path) -> None:
    """Version dir with model.py, and symlinks to the exported model.onnx and fintwin.json."""
    onnx_file = source / MODEL_FILENAME
    if not onnx_file.is_file():
        raise ModelRepositoryError(f"version {source} has no {MODEL_FILENAME}")
    dest.mkdir()
    shutil.copyfile(PYTHON_MODEL_SOURCE, dest / "model.py")
    (dest / MODEL_FILENAME).symlink_to(onnx_file.resolve())
    if (source / METADATA_NAME).is_file():
        (dest / METADATA_NAME).symlink_to((source / METADATA_NAME).resolve())


def _pytriton_dir() -> Path:
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: it provides the tritonserver binary")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_backends(dest: Path) -> Path:
    """Copy the bundled backends to ``dest`` with the python stub matching this interpreter."""
    tritonserver_dir = _pytriton_dir() / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tritonserver_dir / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {python_version}")
    shutil.copytree(tritonserver_dir / "backends", dest)
    shutil.copy2(stub, dest / "python" / stub.name)
    return dest


def server_environment() -> dict[str, str]:
    """Environment for tritonserver and its python stubs.

    PATH starts with this interpreter's bin directory so the stub runs this (virtual)
    environment's python. LD_LIBRARY_PATH holds this interpreter's libpython first: the stub
    otherwise binds the system libpython3.X, whose ABI differs from the running interpreter
    (model load fails with ``'_thread.RLock' object has no attribute '_recursion_count'``),
    then the libraries bundled with nvidia-pytriton (libcudart, ...). The API and admin key
    variables are left out.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not list(
        Path(libdir).glob(f"libpython{sys.version_info.major}.{sys.version_info.minor}*.so*")
    ):
        raise ServerError(
            f"no shared libpython in {libdir}: the python backend stub needs a Python built "
            "with --enable-shared"
        )
    env = without_keys(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    bundled_libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
    library_path = [libdir, str(bundled_libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in library_path if p)
    return env


def check_stub_numpy() -> None:
    """Refuse numpy 2: the python stub of nvidia-pytriton 0.7.0 reads arrays with numpy 1's
    layout, so under numpy 2 every input is silently corrupted and every output comes back empty.
    """
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        raise ServerError(
            f"numpy {np.__version__} is installed, but the tritonserver python stub bundled in "
            "nvidia-pytriton 0.7.0 needs numpy<2 (with numpy 2 it corrupts tensors silently)"
        )


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``host`` right now (held together while choosing)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


class EmbeddedTriton:
    """Run the bundled tritonserver on an exported model repository, as a context manager.

    Binds ``host`` (127.0.0.1 by default) on the given ports, or free ones when None; waits for
    /v2/health/ready (strict readiness: every model loaded) for at most ``startup_timeout_s``.
    The server runs in its own process group, stopped with SIGTERM then SIGKILL, so no python
    stub survives it; it also gets SIGTERM if the thread that started it dies (Linux
    PR_SET_PDEATHSIG), so start it from a thread that outlives it (normally the main thread).
    Temporary files (runtime repository, backends, log) are removed on exit.

    ``tls``: the gRPC endpoint speaks TLS (mutual with a client CA) and the HTTP and metrics
    endpoints bind 127.0.0.1 whatever ``host`` is. ``access``: the keys the server checks
    (``fintwin.serving.security``); by default inference is open and the administrative APIs
    need a random admin key, whose headers ``admin_headers`` gives to this process only.
    """

    def __init__(
        self,
        repo: Path,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        *,
        intra_op_threads: int = 1,
        startup_timeout_s: float = 120.0,
        shutdown_timeout_s: float = 15.0,
        log_verbose: int = 0,
        tls: ServerTls | None = None,
        access: AccessControl | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.host = host
        self.tls = tls
        self.access = access if access is not None else AccessControl()
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.intra_op_threads = intra_op_threads
        self.startup_timeout_s = startup_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.log_verbose = log_verbose
        self.models: list[str] = []
        self.stubs_expected: dict[str, int] = {}  # model -> instances, each one python stub
        self.stubs: dict[int, str] = {}  # pid -> model of the stubs running once ready
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.shm_prefix = f"fintwin_{uuid.uuid4().hex[:12]}_"

    @property
    def http_host(self) -> str:
        """Address of the HTTP and metrics endpoints: loopback when TLS is on."""
        return LOOPBACK if self.tls is not None else self.host

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint, as tritonclient expects it."""
        return f"{_client_host(self.http_host)}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{_client_host(self.host)}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics endpoint."""
        return f"http://{_client_host(self.http_host)}:{self.ports['metrics']}/metrics"

    @property
    def running(self) -> bool:
        """Whether the tritonserver process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        """The server's log file (removed on stop)."""
        if self.workdir is None:
            raise ServerError("the server has not been started")
        return self.workdir / "tritonserver.log"

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers of a request (``protocol`` "grpc" or "http") to an administrative API
        (statistics, model repository, ...)."""
        return self.access.admin_headers(protocol)

    def __enter__(self) -> EmbeddedTriton:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Build the runtime repository, start tritonserver, and wait until it is ready."""
        if self.process is not None:
            raise ServerError("the server is already started")
        check_stub_numpy()
        if self.tls is not None:
            self.tls.check()
        self.workdir = Path(tempfile.mkdtemp(prefix="fintwin-triton-"))
        try:
            self.models = build_runtime_repository(
                self.repo, self.workdir / "models", intra_op_threads=self.intra_op_threads
            )
            self.stubs_expected = {
                name: read_model_config(self.workdir / "models" / name).instance_group[0].count
                for name in self.models
            }
            backends = prepare_backends(self.workdir / "backends")
            self._choose_ports()
            self._launch(backends)
            self._wait_ready()
            self.stubs = python_stubs(self.process.pid)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "tritonserver ready: http %s, grpc %s%s, metrics %s",
            self.http_url,
            self.grpc_url,
            "" if self.tls is None else " (mutual TLS)" if self.tls.client_ca else " (TLS)",
            self.metrics_url,
        )

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM the server, SIGKILL it after ``timeout_s`` (``shutdown_timeout_s``); clean up."""
        if self.process is not None:
            _stop_process_group(
                self.process, self.shutdown_timeout_s if timeout_s is None else timeout_s
            )
            self.process = None
            for region in SHARED_MEMORY_DIR.glob(f"{self.shm_prefix}*"):  # left by a killed stub
                region.unlink(missing_ok=True)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def health_problem(self) -> str | None:
        """Why the server cannot answer every model right now, or None when it can.

        Checks that tritonserver runs and that each model instance's python backend stub (as
        found when the server became ready) is alive. A stub that dies (e.g. killed by the
        kernel's out-of-memory killer) is not restarted by Triton, which keeps reporting the
        server and the model ready while every request to that instance fails with "Stub
        process ... is not healthy". Costs one /proc read per stub.
        """
        if not self.running:
            return f"tritonserver {_describe_exit(self.process.returncode)}"
        alive = Counter(
            model for pid, model in self.stubs.items() if _is_live_child(pid, self.process.pid)
        )
        for model, expected in self.stubs_expected.items():
            if alive[model] < expected:
                return (
                    f"a python backend stub of model {model!r} died ({alive[model]} of "
                    f"{expected} left; killed or crashed, e.g. by the out-of-memory killer): "
                    "Triton does not restart it and that model's requests fail"
                )
        return None

    def log_excerpt(self, tail_lines: int = 8, max_chars: int = 600) -> str:
        """Error lines of the server log, then its last ``tail_lines`` lines (long ones cut)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, ServerError):
            return "(no server log)"
        errors = [line for line in lines if LOG_ERROR_LINE.match(line)]
        excerpt = ["errors:", *errors[-10:], "last lines:", *lines[-tail_lines:]]
        return self.access.redact("\n".join(
            line if len(line) <= max_chars else line[:max_chars] + " ..." for line in excerpt
        ))

    def _choose_ports(self) -> None:
        for name, port in self.ports.items():
            if port is None:
                self.ports[name] = free_ports(self.host if name == "grpc" else self.http_host, 1)[0]

    def _launch(self, backends: Path) -> None:
        command = [
            str(_pytriton_dir() / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={self.workdir / 'models'}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={max(1, int(self.shutdown_timeout_s) - 2)}",
            f"--http-address={self.http_host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={self.http_host}",
            f"--metrics-port={self.ports['metrics']}",
            f"--log-verbose={self.log_verbose}",
            *(self.tls.flags() if self.tls is not None else []),
            *self.access.flags(),
        ]
        logger.debug("starting %s", self.access.redact(shlex.join(command)))
        if self.tls is None and self.host not in LOOPBACK_HOSTS:
            logger.warning(
                "serving plain text on %s: requests, answers and any API key cross the network "
                "unencrypted (give a TLS certificate and key)",
                self.host,
            )
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, called in the child
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(),
                start_new_session=True,
                preexec_fn=lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM),
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        ready_url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if not self.running:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready; "
                    f"its log:\n{self.log_excerpt()}"
                )
            if _http_ok(ready_url):
                return
            time.sleep(0.1)
        raise ServerError(
            f"tritonserver was not ready within {self.startup_timeout_s:.0f} s; "
            f"its log:\n{self.log_excerpt()}"
        )


def _client_host(host: str) -> str:
    """Where a client on this machine reaches an endpoint bound to ``host``."""
    return LOOPBACK if host in ("0.0.0.0", "") else host


def python_stubs(server_pid: int) -> dict[int, str]:
    """Model name of every live python backend stub of the server, by pid (scans /proc)."""
    stubs = {}
    for entry in os.listdir("/proc"):
        if not (entry.isdigit() and _is_live_child(int(entry), server_pid)):
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        if Path(os.fsdecode(argv[0])).name == STUB_NAME:
            model_py = Path(os.fsdecode(argv[1]))  # <runtime repo>/<model>/<version>/model.py
            stubs[int(entry)] = model_py.parent.parent.name
    return stubs


def _is_live_child(pid: int, parent: int) -> bool:
    """Whether ``pid`` is a child of ``parent`` that has not exited (zombies have)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state, ppid = stat.read().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return False
    return int(ppid) == parent and state not in ("Z", "X")


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown signal"
    return f"was killed by signal {-returncode} ({name})"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_process_group(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``timeout_s``; reap the server."""
    group = process.pid  # start_new_session: the server leads its own group
    _signal_group(group, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
        _signal_group(group, signal.SIGKILL)
        process.wait()
    _signal_group(group, signal.SIGKILL)  # python stubs left behind by an unclean exit


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


def serve(
    repo: Path,
    host: str = "127.0.0.1",
    http_port: int | None = 8000,
    grpc_port: int | None = 8001,
    metrics_port: int | None = 8002,
    *,
    intra_op_threads: int = 1,
    tls: ServerTls | None = None,
    access: AccessControl | None = None,
) -> int:
    """``fintwin serve``: run the embedded server until SIGINT/SIGTERM; return the exit code.

    0 after a clean shutdown on a signal, 2 when the repository is unusable (a version whose
    files differ from its integrity manifest included) or a certificate or key is, 1 when the server
    fails to start, or when tritonserver or a model's python backend stub dies while serving:
    checked every ``HEALTH_CHECK_INTERVAL_S``, the server is then stopped at once (its
    endpoints, readiness included, stop answering) so that a supervisor restarts the command.
    Must run in the main thread (it installs signal handlers).
    """
    stop = threading.Event()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda *_: stop.set())
    try:
        with EmbeddedTriton(
            repo,
            host,
            http_port,
            grpc_port,
            metrics_port,
            intra_op_threads=intra_op_threads,
            tls=tls,
            access=access,
        ) as server:
            logger.info("serving %s (models: %s); stop with Ctrl-C", repo, ", ".join(server.models))
            while not stop.wait(HEALTH_CHECK_INTERVAL_S):
                problem = server.health_problem()
                if problem is not None:
                    logger.error(
                        "%s; stopping the server (exit 1, for a supervisor to restart it). "
                        "tritonserver's log:\n%s",
                        problem,
                        server.log_excerpt(),
                    )
                    server.stop(timeout_s=BROKEN_SERVER_STOP_TIMEOUT_S)
                    return 1
        return 0
    except FintwinInputError as exc:
        logger.error("%s", exc)
        return 2
    except ServerError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
