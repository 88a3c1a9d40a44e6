"""``sat-serve``: run the real ``tritonserver`` (from the ``nvidia-pytriton`` wheel) on a model repository."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from satseg.checkout import DEFAULT_REPOSITORY, GET_A_REPOSITORY, IN_CHECKOUT
from satseg.cli.common import StopRequested, cli_parser, run_cli, stop_on_signals
from satseg.contract import (
    ADMIN_HEADER,
    ADMIN_KEY_VARIABLE,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    ENTRY_MODEL,
)
from satseg.errors import SatInputError, one_line
from satseg.server import triton as server_module
from satseg.server.triton import (
    CPU_CONFIG,
    FAILED_STOP_TIMEOUT_S,
    READY_TIMEOUT_S,
    ServerFailure,
    ServerPorts,
    TritonServer,
    free_ports,
)
from satseg.server.watchdog import PROBE_TIMEOUT_S, probe

PROG = "sat-serve"
DEFAULT_PORTS = ServerPorts(http=DEFAULT_HTTP_PORT, grpc=DEFAULT_GRPC_PORT, metrics=DEFAULT_METRICS_PORT)
DEFAULT_CHECK_URL = f"http://127.0.0.1:{DEFAULT_PORTS.http}"
FAILED = 3
"""Exit status when a python-backend process died while serving (1: the server failed to start or exited)."""

EPILOG = f"""examples:
  sat-export models/demo --if-stale && sat-serve      # build (once) and serve the bundled demo model
  sat-serve path/to/repository --http-port 0            # 0: any free port (printed once ready)
  {ADMIN_KEY_VARIABLE}=secret sat-serve --log triton.log  # a fixed admin key; the log in a file
  sat-serve --check {DEFAULT_CHECK_URL}          # liveness: one tiny real inference (exit 0 or 1)

The server listens on 127.0.0.1 only (put TLS in front before exposing it; see deploy/README.md),
with strict readiness, model control "none" (the repository cannot be changed while it runs) and the
model-repository, model-config, shared-memory, statistics, trace and logging endpoints restricted to
requests carrying the header "{ADMIN_HEADER}: <key>". Clients infer with tritonclient or sat-client:
  GET http://127.0.0.1:8000/v2/models/{ENTRY_MODEL}/ready   answers 200 once the ensemble can serve.

HTTP goes through a front in this process (tritonserver's own HTTP listens on a private loopback port):
it refuses with 400 a JSON infer request whose "data" does not hold what its shape declares, an oversized
JSON part, malformed JSON and a gzip/deflate body that inflates past the body limit (Triton 2.51 would
allocate by the declared size first; limits in deploy/README.md). Everything else passes unchanged.
gRPC is tritonserver's own.

A python-backend process that dies (the OOM killer) is never restarted by Triton, which keeps answering
ready. sat-serve watches them: within a second it prints which model died, the health and ready endpoints
answer 503, and it stops the server (SIGKILL after {FAILED_STOP_TIMEOUT_S:.0f} s), removes the shared memory left in
/dev/shm and exits with status {FAILED}. Restarting is the supervisor's job (systemd Restart=on-failure,
Kubernetes, docker --restart).

The admin key is on tritonserver's command line (Triton 2.51 takes it no other way), which any local user
can read in /proc unless /proc is mounted with hidepid=2 or the server runs in its own container or user.
A random key is not printed unless --print-admin-key; set ${ADMIN_KEY_VARIABLE} where clients need it
(shared memory, statistics).
Ctrl-C or SIGTERM stops it gracefully (requests in flight finish).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Serve the SAT ensemble with the pip tritonserver (CPU, loopback).", EPILOG)
    parser.add_argument(
        "repository", type=Path, nargs="?", help="model repository (default: triton_repo/ of the source checkout)"
    )
    parser.add_argument(
        "--config-name",
        default=CPU_CONFIG,
        help='configs/<name>.pbtxt where a model has one (default "cpu"); "default": each config.pbtxt (GPU)',
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_PORTS.http, help="HTTP port (default 8000; 0: free)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS.grpc, help="gRPC port (default 8001; 0: free)")
    parser.add_argument(
        "--metrics-port", type=int, default=DEFAULT_PORTS.metrics, help="Prometheus metrics port (default 8002)"
    )
    parser.add_argument("--log", type=Path, help="append the server log to this file (default: the console)")
    parser.add_argument(
        "--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for readiness (default 120)"
    )
    parser.add_argument(
        "--print-admin-key", action="store_true", help="print the admin key once ready (a random one is not shown)"
    )
    parser.add_argument(
        "--check",
        nargs="?",
        const=DEFAULT_CHECK_URL,
        metavar="URL",
        help=f"serve nothing: send one tiny real inference to URL (default {DEFAULT_CHECK_URL}) and exit 0 if it "
        "was answered, 1 if not (for Docker HEALTHCHECK and Kubernetes exec probes)",
    )
    parser.add_argument(
        "--check-timeout", type=float, default=PROBE_TIMEOUT_S, help="seconds --check waits (default 30)"
    )
    return parser.parse_args(argv)


def chosen_ports(args: argparse.Namespace) -> ServerPorts:
    """The requested ports, with each 0 replaced by a free one."""
    requested = [args.http_port, args.grpc_port, args.metrics_port]
    spare = iter(free_ports(requested.count(0), args.host))
    return ServerPorts(*(port or next(spare) for port in requested))


def check(url: str, timeout_s: float) -> int:
    """``--check``: 0 if ``url`` answered a tiny inference, else 1 with the reason on one line."""
    problem = probe(url, ENTRY_MODEL, timeout_s)
    if problem is not None:
        print(f"{PROG}: check failed: {one_line(problem)}", file=sys.stderr)
        return 1
    print(f"{PROG}: {url} answered", flush=True)
    return 0


def admin_key_note(from_environment: bool, key: str, show: bool) -> str:
    """How the ready banner names the admin key: never the key itself unless asked."""
    if show:
        return key
    if from_environment:
        return f"from ${ADMIN_KEY_VARIABLE}"
    return f"random, not shown (--print-admin-key shows it; ${ADMIN_KEY_VARIABLE} sets one)"


def choose_repository(requested: Path | None) -> Path:
    if requested is not None:
        return requested
    if IN_CHECKOUT:
        return DEFAULT_REPOSITORY
    raise SatInputError(f"no model repository: {GET_A_REPOSITORY}")


def serve(args: argparse.Namespace) -> int:
    admin_key = os.environ.get(ADMIN_KEY_VARIABLE)
    server = TritonServer(
        choose_repository(args.repository),
        config_name=None if args.config_name == "default" else args.config_name,
        host=args.host,
        ports=chosen_ports(args),
        log_path=args.log,
        admin_key=admin_key,
    )
    stop_on_signals(signal.SIGTERM, signal.SIGHUP)
    # The server module logs a dead stub and removed shared memory for library users; sat-serve says both itself.
    logging.getLogger(server_module.__name__).addHandler(logging.NullHandler())
    print(f"{PROG}: starting tritonserver on {server.repository} …", flush=True)
    try:
        server.start(args.ready_timeout)
        key = admin_key_note(admin_key is not None, server.admin_key, args.print_admin_key)
        models = ", ".join(sorted({stub.model for stub in server.stubs})) or "none"
        print(
            f"{PROG}: ready (pid {server.pid})\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  HTTP     http://{server.http_url}  (ready: /v2/models/{ENTRY_MODEL}/ready)\n"
            f"  metrics  {server.metrics_url}\n"
            f"  admin    header {ADMIN_HEADER}: {key}\n"
            f"  watched  python-backend processes of {models}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        code = server.wait()
        print(f"{PROG}: tritonserver exited by itself (code {code}):\n{server.log_tail()}", file=sys.stderr)
        return 1
    except ServerFailure as failure:
        print(f"{PROG}: error: {failure}; stopping", file=sys.stderr, flush=True)
        code = server.stop()
        removed = f", removed {len(server.removed_regions)} shared-memory region(s)" if server.removed_regions else ""
        print(f"{PROG}: stopped (tritonserver exit code {code}{removed})", file=sys.stderr, flush=True)
        return FAILED
    except RuntimeError as error:  # died or never became ready; the message ends with the log's tail
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, StopRequested):
        print(f"{PROG}: stopping (requests in flight finish first) …", flush=True)
        code = server.stop()
        print(f"{PROG}: stopped (tritonserver exit code {code})", flush=True)
        return 0
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check is not None:
        return check(args.check, args.check_timeout)
    return run_cli(PROG, lambda: serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
