"""``sat-loadtest``: a headless Locust run against the served ensemble, with a report that reconciles with Triton.

Starts the pip ``tritonserver`` on loopback (unless ``--url`` names a running server), scrapes Triton's
metrics before and after, runs Locust headless for a bounded time, and writes into
``loadtest/results/<timestamp>/``: Locust's CSVs and HTML report, ``summary.md`` (Locust's numbers next to
Triton's over the same window, and whether they agree) and ``throughput.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from satseg import contract
from satseg.checkout import BUNDLED_CHECKPOINT, DEFAULT_REPOSITORY
from satseg.cli.common import cli_parser, run_cli
from satseg.server.triton import TritonServer
from satseg_export.build_repo import ExportSettings, build_repository, repository_is_current
from satseg_loadtest.metrics import EnsembleRequests, ModelWindow, difference, ensemble_requests, model_window, scrape
from satseg_loadtest.scenarios import MALFORMED_SHARE, SCENARIOS

PROG = "sat-loadtest"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
RESULTS = Path("loadtest") / "results"
STEPS = contract.MODELS[1:]
"""The ensemble's composing models: their queue and compute times are their own (the ensemble's are sums)."""
TOTALS_FILE = "locust_totals.json"
AGREEMENT = 0.05
"""Locust's and Triton's counts and mean latencies must agree within this fraction."""

EPILOG = """examples:
  sat-loadtest                                         # start a CPU server, 2 users of ct_small for 60 s
  sat-loadtest --scenario mixed --users 4 --duration 5m
  sat-loadtest --url gpu-server:8000 --metrics-url http://gpu-server:8002/metrics --max-p95-ms 20000
  sat-loadtest --scenario bad_inputs --protocol grpc --max-fail-ratio 0

scenarios: ct_small (a small-FOV CT, 3 prompts), ct_large (512x512x300, 1 prompt), many_prompts (32),
mixed (70/20/10 of those), bad_inputs (5% malformed: each must come back INVALID_ARG).
Exit status: Locust's: 1 when the failure ratio or p95 crosses its threshold, so the command gates a
deployment. See loadtest/README.md for what each number means.
"""


@dataclass(frozen=True)
class LocustRun:
    """What one Locust run is asked to do."""

    host: str
    protocol: str
    scenario: str
    users: int
    spawn_rate: float
    duration: str
    max_fail_ratio: float
    max_p95_ms: float
    malformed_share: float = MALFORMED_SHARE


@dataclass(frozen=True)
class LocustTotals:
    """Locust's final totals (after the requests in flight at the end finished)."""

    requests: int
    failures: int
    valid_requests: int
    rejected_as_expected: int
    mean_ms: float
    valid_mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser(PROG, "Load-test the served SAT ensemble with Locust (headless, bounded).", EPILOG)
    parser.add_argument("--url", help="host:port of a running server (default: start one on loopback)")
    parser.add_argument("--metrics-url", help="its metrics endpoint (default http://<host>:8002/metrics)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="default http")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="ct_small", help="default ct_small")
    parser.add_argument("--users", type=int, default=2, help="concurrent users (default 2)")
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second (default 2)")
    parser.add_argument("--duration", default="60s", help="run time, e.g. 30s, 5m (default 60s)")
    parser.add_argument("--max-fail-ratio", type=float, default=0.0, help="gate: failure ratio (default 0)")
    parser.add_argument("--max-p95-ms", type=float, default=0.0, help="gate: p95 latency in ms (default off)")
    parser.add_argument(
        "--malformed-share", type=float, default=MALFORMED_SHARE, help="bad_inputs: malformed share (default 0.05)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="results root (default loadtest/results)")
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT, help="served when no --url")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="served when no --url")
    return parser.parse_args(argv)


@contextmanager
def served(args: argparse.Namespace, folder: Path) -> Iterator[tuple[str, str]]:
    """``(host:port, metrics URL)`` of the server to test: the one named, or one started here and stopped after."""
    if args.url:
        host = args.url.rsplit(":", 1)[0]
        yield args.url, args.metrics_url or f"http://{host}:8002/metrics"
        return
    settings = ExportSettings(checkpoint=args.checkpoint, repository=args.repository)
    if not repository_is_current(settings):
        build_repository(settings)
    with TritonServer(args.repository, log_path=folder / "tritonserver.log") as server:
        yield (server.grpc_url if args.protocol == "grpc" else server.http_url), server.metrics_url


def run_locust(run: LocustRun, folder: Path) -> int:
    """Locust headless into ``folder`` (CSV with history, HTML); its exit code applies the thresholds."""
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", run.host, "--users", str(run.users), "--spawn-rate", str(run.spawn_rate),
        "--run-time", run.duration, "--stop-timeout", "900",
        "--csv", str(folder / "locust"), "--csv-full-history", "--html", str(folder / "report.html"),
        "--scenario", run.scenario, "--protocol", run.protocol,
        "--max-fail-ratio", str(run.max_fail_ratio), "--max-p95-ms", str(run.max_p95_ms),
        "--totals-json", str(folder / TOTALS_FILE), "--malformed-share", str(run.malformed_share),
    ]  # fmt: skip
    return subprocess.run(command, check=False).returncode


def locust_totals(folder: Path) -> LocustTotals:
    totals = json.loads((folder / TOTALS_FILE).read_text())
    total = totals["total"]
    rejected = sum(
        int(entry["requests"]) for name, entry in totals["by_name"].items() if "rejected as expected" in name
    )
    valid = [entry for name, entry in totals["by_name"].items() if "rejected as expected" not in name]
    valid_count = sum(int(entry["requests"]) for entry in valid)
    valid_mean = sum(entry["mean_ms"] * entry["requests"] for entry in valid) / valid_count if valid_count else 0.0
    return LocustTotals(
        requests=int(total["requests"]),
        failures=int(total["failures"]),
        valid_requests=int(total["requests"]) - rejected,
        rejected_as_expected=rejected,
        mean_ms=float(total["mean_ms"]),
        valid_mean_ms=float(valid_mean),
        p50_ms=float(total["p50"]),
        p95_ms=float(total["p95"]),
        p99_ms=float(total["p99"]),
    )


def agrees(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= AGREEMENT * max(abs(theirs), 1e-9)


def summary(
    run: LocustRun, locust: LocustTotals, models: dict[str, ModelWindow], served: EnsembleRequests, seconds: float
) -> str:
    """The Markdown report: Locust's view, Triton's view of the same window, and whether they reconcile."""
    sat = models[contract.ENTRY_MODEL]
    minutes = seconds / 60.0
    counted = agrees(locust.valid_requests, served.succeeded) and agrees(locust.rejected_as_expected, served.refused)
    timed = agrees(locust.valid_mean_ms, sat.mean_request_ms) if sat.success else False
    failure_rate = locust.failures / locust.requests if locust.requests else 0.0
    lines = [
        f"# Load test: {run.scenario}, {run.users} users, {run.duration}, {run.protocol}",
        "",
        f"Window: {seconds:.0f} s, the same for both views (Locust's run, from its start until the requests in "
        "flight at the end finished). Volumes are valid requests that succeeded.",
        "",
        "| view | volumes/min | requests/s | p50 | p95 | p99 | mean | failure rate |",
        "|---|---|---|---|---|---|---|---|",
        f"| Locust (client) | {(locust.valid_requests - locust.failures) / minutes:.2f} | "
        f"{locust.requests / seconds:.3f} | "
        f"{locust.p50_ms:.0f} ms | {locust.p95_ms:.0f} ms | {locust.p99_ms:.0f} ms | {locust.mean_ms:.0f} ms | "
        f"{failure_rate:.2%} |",
        f"| Triton (`sat`, server) | {served.succeeded / minutes:.2f} | {served.total / seconds:.3f} | | | | "
        f"{sat.mean_request_ms:.0f} ms (valid) | {served.refused / max(served.total, 1):.2%} refused |",
        "",
        "| model | requests | failures | mean queue | mean compute |",
        "|---|---|---|---|---|",
    ]
    for name in STEPS:
        window = models[name]
        count = max(window.success + window.failure, 1.0)
        lines.append(
            f"| `{name}` | {window.success:.0f} | {window.failure:.0f} | {window.queue_ms / count:.1f} ms | "
            f"{window.compute_ms / count:.1f} ms |"
        )
    lines += [
        "",
        f"- Requests: Locust sent {locust.valid_requests} valid and {locust.rejected_as_expected} malformed; "
        f"Triton answered {served.succeeded:.0f} and refused {served.refused:.0f} `sat` requests: "
        + ("**they agree**." if counted else f"**they disagree** (more than {AGREEMENT:.0%})."),
        f"- Mean latency of valid requests: Locust {locust.valid_mean_ms:.0f} ms against Triton's `sat` request time "
        f"{sat.mean_request_ms:.0f} ms: "
        + ("**within 5%**" if timed else "**not within 5%**")
        + " (the difference is the client, the socket and serialisation).",
        f"- Failures (valid requests that failed, or malformed ones accepted): {locust.failures}.",
    ]
    return "\n".join(lines) + "\n"


def plot_history(folder: Path) -> Path:
    """``throughput.png``: requests/s and p95 against concurrent users, from Locust's history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (folder / "locust_stats_history.csv").open() as stream:
        rows = [row for row in csv.DictReader(stream) if row["Name"] == "Aggregated" and row["95%"] not in ("", "N/A")]
    users = [int(row["User Count"]) for row in rows]
    figure, throughput = plt.subplots(figsize=(7, 4))
    throughput.plot(users, [float(row["Requests/s"]) for row in rows], "o", color="tab:blue", alpha=0.5)
    throughput.set_xlabel("concurrent users")
    throughput.set_ylabel("requests/s", color="tab:blue")
    latency = throughput.twinx()
    latency.plot(users, [float(row["95%"]) / 1000.0 for row in rows], "s", color="tab:red", alpha=0.5)
    latency.set_ylabel("p95 latency (s)", color="tab:red")
    figure.suptitle("SAT load test: throughput and p95 against users")
    figure.tight_layout()
    path = folder / "throughput.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def load_test(args: argparse.Namespace) -> int:
    folder = args.output / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    with served(args, folder) as (host, metrics_url):
        run = LocustRun(
            host, args.protocol, args.scenario, args.users, args.spawn_rate, args.duration,
            args.max_fail_ratio, args.max_p95_ms, args.malformed_share,
        )  # fmt: skip
        before, started = scrape(metrics_url), time.monotonic()
        code = run_locust(run, folder)
        seconds, after = time.monotonic() - started, scrape(metrics_url)
    delta = difference(after, before)
    models = {model: model_window(delta, model) for model in contract.MODELS}
    report = summary(run, locust_totals(folder), models, ensemble_requests(delta), seconds)
    (folder / "summary.md").write_text(report)
    plot_history(folder)
    print(report)
    print(f"{PROG}: results in {folder} (exit {code})")
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: load_test(args))


if __name__ == "__main__":
    raise SystemExit(main())
