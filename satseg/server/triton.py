"""Start the real ``tritonserver`` that the ``nvidia-pytriton`` wheel carries, on the CPU, and stop it cleanly.

The wheel is the only pip source of a Triton binary (2.51, python backend only). Running it takes a
runtime folder (``bin``, ``backends``, ``caches``) with the python-backend stub of *this* interpreter, the
interpreter's own ``libpython`` first on ``LD_LIBRARY_PATH`` (else the stub loads the system one and
breaks), and this environment's ``bin`` first on ``PATH`` (the stub finds its packages through
``python3``, not ``PYTHONPATH``). :class:`TritonServer` does all of that.

Two guards Triton 2.51 lacks run beside it: the HTTP front (:mod:`satseg.server.front`) owns the public
HTTP port, refusing JSON requests that would make the server allocate by a lying shape, and the stub
watchdog (:mod:`satseg.server.watchdog`) notices a python-backend process that died, which the server
itself never reports. Stopping removes the shared-memory regions a killed server leaves in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
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
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from satseg.contract import ADMIN_HEADER, CONTRACT_FILE, ENTRY_MODEL
from satseg.errors import SatInputError
from satseg.server.watchdog import SHM, Stub, StubWatchdog, is_alive, python_stubs, shm_regions, unlink_regions

if TYPE_CHECKING:
    from satseg.server.front import HttpFront

LOG = logging.getLogger(__name__)

CPU_CONFIG = "cpu"
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
"""Endpoints that need the admin header (BRIEF conventions): clients only infer and read health/metadata."""
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
"""Graceful stop: requests in flight may finish for this long."""
FAILED_STOP_TIMEOUT_S = 2.0
"""Stop of a server whose stub died: nothing in flight can finish, so SIGKILL follows soon."""
NO_TRITON = (
    "tritonserver is not installed in this environment; install the serving extra "
    '(pip install -e ".[serve]") or use NVIDIA\'s Triton container on a GPU server (deploy/README.md)'
)


@dataclass(frozen=True)
class ServerPorts:
    """TCP ports of the three endpoints, all on ``host`` (``http`` is the HTTP front's)."""

    http: int
    grpc: int
    metrics: int


class ServerFailure(RuntimeError):
    """The server can no longer answer (a python-backend process died); it must be stopped."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the OS reports free now (a race is caught later: a busy port kills the server)."""
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind((host, 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def pytriton_root() -> Path:
    """The ``tritonserver`` folder inside the installed ``nvidia-pytriton`` wheel.

    Raises:
        SatInputError: the wheel is not installed.
    """
    try:
        import pytriton
    except ImportError:
        raise SatInputError(NO_TRITON) from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise SatInputError(NO_TRITON)
    return root


def build_runtime(target: Path) -> Path:
    """Copy ``bin``, ``backends`` and ``caches`` into ``target`` and add this Python's backend stub."""
    root = pytriton_root()
    for name in ("bin", "backends", "caches"):
        shutil.copytree(root / name, target / name, dirs_exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise SatInputError(f"nvidia-pytriton has no python-backend stub for Python {version}; use Python 3.10-3.13")
    shutil.copy2(stub, target / "backends" / "python" / stub.name)
    return target


def server_environment() -> dict[str, str]:
    """The environment the server and its python stubs need (library path and ``PATH`` order matter)."""
    root = pytriton_root()
    libraries = [str(sysconfig.get_config_var("LIBDIR")), str(root.parent.parent / "nvidia_pytriton.libs")]
    environment = dict(os.environ)
    previous = environment.get("LD_LIBRARY_PATH")
    environment["LD_LIBRARY_PATH"] = ":".join(libraries + ([previous] if previous else []))
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


def server_arguments(
    runtime: Path,
    repository: Path,
    ports: ServerPorts,
    host: str,
    config_name: str | None,
    admin_key: str,
    http_host: str | None = None,
) -> list[str]:
    """The ``tritonserver`` command line: loopback by default, strict readiness, no model control, restricted APIs.

    ``http_host`` binds the server's own HTTP endpoint elsewhere than ``host`` (loopback behind the front).
    """
    arguments = [
        str(runtime / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={runtime / 'backends'}",
        f"--cache-directory={runtime / 'caches'}",
        f"--http-address={http_host or host}",
        f"--http-port={ports.http}",
        f"--grpc-address={host}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        "--model-control-mode=none",
        "--disable-auto-complete-config",
        f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_key}",
        f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_key}",
    ]
    if config_name:
        arguments.append(f"--model-config-name={config_name}")
    return arguments


class TritonServer:
    """One ``tritonserver`` process serving ``repository``; a context manager that stops it on exit.

    Clients reach HTTP through the front on ``ports.http`` (the server's own HTTP endpoint listens on a
    private loopback port); gRPC and metrics are the server's own. Once ready, a watchdog checks the
    python-backend processes every half second: when one dies, :attr:`failure` names its model, the front's
    health and readiness endpoints answer 503 and :meth:`wait` raises :class:`ServerFailure`.

    Args:
        repository: a model repository filled by ``sat-export``.
        config_name: ``configs/<name>.pbtxt`` to use where a model has one (``cpu``); ``None``: ``config.pbtxt``.
        host: address all endpoints bind (loopback by default; put TLS in front before exposing it).
        ports: fixed ports, or free ones chosen now.
        log_path: file the server log is appended to (default: this process's console).
        admin_key: value of the ``sat-admin-key`` header the restricted endpoints require (random by default).
            It is on tritonserver's command line, which Triton 2.51 offers no other way to take.
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        config_name: str | None = CPU_CONFIG,
        host: str = "127.0.0.1",
        ports: ServerPorts | None = None,
        log_path: Path | None = None,
        admin_key: str | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not (self.repository / ENTRY_MODEL).is_dir():
            raise SatInputError(
                f"{self.repository} is not a SAT model repository (no {ENTRY_MODEL}/); build it with sat-export"
            )
        if not (self.repository / ENTRY_MODEL / CONTRACT_FILE).is_file():
            raise SatInputError(
                f"{self.repository} was never exported (no {ENTRY_MODEL}/{CONTRACT_FILE}): run `just export` or "
                f"`sat-export CHECKPOINT --repository {self.repository}` first"
            )
        self.config_name = config_name
        self.host = host
        self.ports = ports or ServerPorts(*free_ports(3, host))
        self.admin_key = admin_key or secrets.token_hex(16)
        self.log_path = log_path
        self.failure: str | None = None
        """Why the server can no longer answer (set by the watchdog), or ``None``."""
        self.stubs: list[Stub] = []
        """The python-backend processes recorded when the server turned ready."""
        self.removed_regions: list[Path] = []
        """``/dev/shm`` regions the last stop had to remove because the server left them."""
        self._runtime: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._triton_http_port: int | None = None
        self._front: HttpFront | None = None
        self._watchdog: StubWatchdog | None = None
        self._regions: set[Path] = set()
        self._failed = threading.Event()

    @property
    def http_url(self) -> str:
        """The public HTTP endpoint (the front)."""
        return f"{self.host}:{self.ports.http}"

    @property
    def triton_http_url(self) -> str:
        """tritonserver's own HTTP endpoint on loopback, behind the front (for measurements and tests)."""
        return f"127.0.0.1:{self._triton_http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> TritonServer:
        """Start the server and wait until ``sat`` is ready; then start watching its python-backend processes.

        Raises:
            RuntimeError: the HTTP port is busy, the process died (a busy port, a model that failed to load)
                or was not ready in ``timeout_s``; the message ends with the log's last lines.
        """
        try:
            from satseg.server.front import HttpFront  # aiohttp: only where a server runs
        except ImportError:
            raise SatInputError(NO_TRITON) from None
        listening = bind_listener(self.host, self.ports.http)  # first: a busy port fails before any loading
        self._triton_http_port = free_ports(1)[0]
        self._failed.clear()
        self.failure, self.stubs = None, []
        try:
            self._launch()
            self._front = HttpFront(listening, f"http://{self.triton_http_url}", lambda: self.failure).start()
        except BaseException:
            listening.close()
            self.stop()
            raise
        self._wait_ready(timeout_s)
        self._watch()
        return self

    def _launch(self) -> None:
        """Start tritonserver with its own HTTP on a private loopback port (the front takes the public one)."""
        self._runtime = build_runtime(Path(tempfile.mkdtemp(prefix="sat-triton-")))
        private = replace(self.ports, http=self._triton_http_port)
        command = server_arguments(
            self._runtime, self.repository, private, self.host, self.config_name, self.admin_key, "127.0.0.1"
        )
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - the child keeps it open
        try:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True
            )
        finally:
            if log:
                log.close()

    def _watch(self) -> None:
        """Record the python-backend processes and their shared memory, and start the watchdog on them."""
        assert self._process is not None
        self.stubs = python_stubs(self._process.pid)
        self._regions = self._current_regions(self._process.pid)
        self._watchdog = StubWatchdog(self.stubs, self._fail).start()

    def _current_regions(self, server_pid: int) -> set[Path]:
        """The python backend's regions known so far, plus those the server and its stubs map now."""
        pids = [stub.pid for stub in self.stubs] + [server_pid]
        return self._regions | shm_regions(pids) | {SHM / stub.region for stub in self.stubs}

    def _fail(self, reason: str) -> None:
        """The watchdog saw a stub die: remember why (the front's probes now fail) and wake :meth:`wait`."""
        if self._process is not None and self._process.poll() is not None:
            reason = f"tritonserver exited (code {self._process.returncode}); {reason}"
        self.failure = reason
        LOG.error("%s", reason)
        self._failed.set()

    def is_ready(self) -> bool:
        """Whether the entry model answers ready through the front (what load balancers and probes ask)."""
        return url_ready(self.http_url)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                self.stop()
                raise RuntimeError(f"tritonserver exited (code {code}) before it was ready:\n{self.log_tail()}")
            if url_ready(self.triton_http_url):
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` of the server log (for error messages and failed tests)."""
        if self.log_path is None:
            return "(the server log is on the console above)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {self.log_path})"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL of the process group after ``timeout_s`` (after
        :data:`FAILED_STOP_TIMEOUT_S` once a stub died); then the front stops and leftover shared memory goes.

        Returns:
            The server's exit code (``None`` if it was not running).
        """
        if self._watchdog is not None:
            self._watchdog.stop()  # first: stubs ending in a graceful stop are no failure
            self._watchdog = None
        process, self._process = self._process, None
        code = None
        if process is not None:
            self._regions = self._current_regions(process.pid)
            code = terminate(process, FAILED_STOP_TIMEOUT_S if self.failure else timeout_s)
        if self._front is not None:
            self._front.stop()
            self._front = None
        for stub in self.stubs:
            if is_alive(stub):  # orphaned when the server was killed: they hold the regions
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stub.pid, signal.SIGKILL)
        self.removed_regions = unlink_regions(self._regions)
        if self.removed_regions:
            LOG.warning("removed %d shared-memory region(s) the server left behind", len(self.removed_regions))
        self._regions = set()
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None
        return code

    def wait(self) -> int:
        """Block until the server exits by itself (its exit code) or a stub dies.

        Raises:
            ServerFailure: the watchdog saw a python-backend process die; :attr:`failure` says which.
        """
        process = self._process
        if process is None:
            raise RuntimeError("the server is not running")
        while process.poll() is None and not self._failed.wait(WAIT_POLL_S):
            pass
        if self.failure is not None:
            raise ServerFailure(self.failure)
        return process.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self._process is None else self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


WAIT_POLL_S = 0.5


def bind_listener(host: str, port: int) -> socket.socket:
    """A bound TCP socket for the HTTP front (listening starts with the front).

    Raises:
        RuntimeError: the port is taken.
    """
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart must not wait for TIME_WAIT
    try:
        listening.bind((host, port))
    except OSError as error:
        listening.close()
        raise RuntimeError(f"cannot listen on {host}:{port} for HTTP ({error.strerror})") from None
    return listening


def url_ready(address: str) -> bool:
    """Whether ``http://address/v2/models/sat/ready`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{address}/v2/models/{ENTRY_MODEL}/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def terminate(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM ``process``; SIGKILL its whole process group (its stubs) if it is still there after ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode
