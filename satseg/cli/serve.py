"""``sat-serve``: run the real ``tritonserver`` (from the ``nvidia-pytriton`` wheel) on a model repository."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from satseg.cli.common import cli_parser, run_cli
from satseg.serving.server import (
    ADMIN_HEADER,
    CPU_CONFIG,
    DEFAULT_REPOSITORY,
    ENTRY_MODEL,
    READY_TIMEOUT_S,
    ServerPorts,
    TritonServer,
    free_ports,
)

PROG = "sat-serve"
ADMIN_KEY_VARIABLE = "SAT_ADMIN_KEY"
DEFAULT_PORTS = ServerPorts(http=8000, grpc=8001, metrics=8002)

EPILOG = f"""examples:
  sat-export models/demo --if-stale && sat-serve      # build (once) and serve the bundled demo model
  sat-serve path/to/repository --http-port 0            # 0: any free port (printed once ready)
  {ADMIN_KEY_VARIABLE}=secret sat-serve --log triton.log  # a fixed admin key; the log in a file

The server listens on 127.0.0.1 only (put TLS in front before exposing it; see deploy/README.md),
with strict readiness, model control "none" (the repository cannot be changed while it runs) and the
model-repository, model-config, shared-memory, statistics, trace and logging endpoints restricted to
requests carrying the header "{ADMIN_HEADER}: <key>". Clients infer with tritonclient or sat-client:
  GET http://127.0.0.1:8000/v2/models/{ENTRY_MODEL}/ready   answers 200 once the ensemble can serve.
Ctrl-C or SIGTERM stops it gracefully (requests in flight finish).
"""


class StopRequested(Exception):
    """SIGTERM or SIGHUP arrived: leave the wait and stop the server."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Serve the SAT ensemble with the pip tritonserver (CPU, loopback).", EPILOG)
    parser.add_argument(
        "repository", type=Path, nargs="?", default=DEFAULT_REPOSITORY, help="model repository (default triton_repo/)"
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
    return parser.parse_args(argv)


def chosen_ports(args: argparse.Namespace) -> ServerPorts:
    """The requested ports, with each 0 replaced by a free one."""
    requested = [args.http_port, args.grpc_port, args.metrics_port]
    spare = iter(free_ports(requested.count(0), args.host))
    return ServerPorts(*(port or next(spare) for port in requested))


def raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


def serve(args: argparse.Namespace) -> int:
    admin_key = os.environ.get(ADMIN_KEY_VARIABLE)
    server = TritonServer(
        args.repository,
        config_name=None if args.config_name == "default" else args.config_name,
        host=args.host,
        ports=chosen_ports(args),
        log_path=args.log,
        admin_key=admin_key,
    )
    for handled in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(handled, raise_stop)
    print(f"{PROG}: starting tritonserver on {server.repository} …", flush=True)
    try:
        server.start(args.ready_timeout)
        key = f"from ${ADMIN_KEY_VARIABLE}" if admin_key else f"{server.admin_key} (random; set ${ADMIN_KEY_VARIABLE})"
        print(
            f"{PROG}: ready (pid {server.pid})\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  HTTP     http://{server.http_url}  (ready: /v2/models/{ENTRY_MODEL}/ready)\n"
            f"  metrics  {server.metrics_url}\n"
            f"  admin    header {ADMIN_HEADER}: {key}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        code = server.wait()
        print(f"{PROG}: tritonserver exited by itself (code {code}):\n{server.log_tail()}", file=sys.stderr)
        return 1
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
    return run_cli(PROG, lambda: serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
