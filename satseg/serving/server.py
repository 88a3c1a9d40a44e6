"""Start the real ``tritonserver`` that the ``nvidia-pytriton`` wheel carries, on the CPU, and stop it cleanly.

The wheel is the only pip source of a Triton binary (2.51, python backend only). Running it takes a
runtime folder (``bin``, ``backends``, ``caches``) with the python-backend stub of *this* interpreter, the
interpreter's own ``libpython`` first on ``LD_LIBRARY_PATH`` (else the stub loads the system one and
breaks), and this environment's ``bin`` first on ``PATH`` (the stub finds its packages through
``python3``, not ``PYTHONPATH``). :class:`TritonServer` does all of that.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from satseg.errors import SatInputError

ENTRY_MODEL = "sat"
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_repo"
"""The versioned repository of this checkout (``sat-export`` fills its built artefacts)."""
CPU_CONFIG = "cpu"
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
"""Endpoints that need the admin header (BRIEF conventions): clients only infer and read health/metadata."""
ADMIN_HEADER = "sat-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
"""gRPC clients send the key under this name: Triton prefixes restricted-protocol headers on gRPC."""
READY_TIMEOUT_S = 120.0
NO_TRITON = (
    "tritonserver is not installed in this environment; install the serving extra "
    '(pip install -e ".[serve]") or use NVIDIA\'s Triton container on a GPU server (deploy/README.md)'
)


@dataclass(frozen=True)
class ServerPorts:
    """TCP ports of the three endpoints, all on ``host``."""

    http: int
    grpc: int
    metrics: int


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
    runtime: Path, repository: Path, ports: ServerPorts, host: str, config_name: str | None, admin_key: str
) -> list[str]:
    """The ``tritonserver`` command line: loopback by default, strict readiness, no model control, restricted APIs."""
    arguments = [
        str(runtime / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={runtime / 'backends'}",
        f"--cache-directory={runtime / 'caches'}",
        f"--http-address={host}",
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

    Args:
        repository: a model repository filled by ``sat-export``.
        config_name: ``configs/<name>.pbtxt`` to use where a model has one (``cpu``); ``None``: ``config.pbtxt``.
        host: address all endpoints bind (loopback by default; put TLS in front before exposing it).
        ports: fixed ports, or free ones chosen now.
        log_path: file the server log is appended to (default: this process's console).
        admin_key: value of the ``sat-admin-key`` header the restricted endpoints require (random by default).
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
        self.config_name = config_name
        self.host = host
        self.ports = ports or ServerPorts(*free_ports(3, host))
        self.admin_key = admin_key or secrets.token_hex(16)
        self._runtime: Path | None = None
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

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
        """Start the server and wait until ``sat`` is ready.

        Raises:
            RuntimeError: the process died (a busy port, a model that failed to load) or was not ready in
                ``timeout_s``; the message ends with the log's last lines.
        """
        self._runtime = build_runtime(Path(tempfile.mkdtemp(prefix="sat-triton-")))
        command = server_arguments(
            self._runtime, self.repository, self.ports, self.host, self.config_name, self.admin_key
        )
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - the child keeps it open
        try:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True
            )
        finally:
            if log:
                log.close()
        self._wait_ready(timeout_s)
        return self

    def is_ready(self) -> bool:
        """Whether the entry model answers ready on HTTP (what load balancers and probes should ask)."""
        url = f"http://{self.http_url}/v2/models/{ENTRY_MODEL}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise RuntimeError(f"tritonserver exited (code {code}) before it was ready:\n{self.log_tail()}")
            if self.is_ready():
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

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL after ``timeout_s``; returns the exit code."""
        process, self._process = self._process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            code = process.returncode
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None
        return code

    def wait(self) -> int:
        """Block until the server exits by itself; its exit code."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self._process is None else self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
