"""``sat-loadtest-sweep``: throughput and p95 over user counts and instance counts, to see where it saturates.

For each instance configuration of ``loadtest/sweep.toml`` a copy of the model repository gets those
``count:`` values in ``segmenter`` and ``vision``'s CPU configs and is served; each user count then runs
one bounded Locust test. ``sweep.md`` and ``sweep.png`` collect every run's numbers.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from satseg import contract
from satseg.checkout import BUNDLED_CHECKPOINT, DEFAULT_REPOSITORY
from satseg.cli.common import cli_parser, run_cli
from satseg.server.triton import CPU_CONFIG, TritonServer
from satseg_export.build_repo import ExportSettings, build_repository, repository_is_current
from satseg_loadtest.metrics import difference, ensemble_requests, scrape
from satseg_loadtest.run import RESULTS, LocustRun, locust_totals, run_locust

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PROG = "sat-loadtest-sweep"
SWEEP_CONFIG = Path(__file__).with_name("sweep.toml")
SCALED_MODELS = (contract.SEGMENTER_MODEL, contract.VISION_MODEL)


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep."""

    instances: dict[str, int]
    users: int
    volumes_per_minute: float
    p95_ms: float
    failures: int
    triton_requests: float


def with_instances(repository: Path, target: Path, counts: dict[str, int]) -> Path:
    """A copy of ``repository`` whose CPU configs run ``counts[model]`` instances of each scaled model."""
    shutil.copytree(repository, target, symlinks=True)
    for model, count in counts.items():
        if model not in SCALED_MODELS:
            raise ValueError(f"instance counts apply to {', '.join(SCALED_MODELS)}, not {model!r}")
        config = target / model / "configs" / f"{CPU_CONFIG}.pbtxt"
        text, replaced = re.subn(r"count:\s*\d+", f"count: {int(count)}", config.read_text())
        if replaced != 1:
            raise ValueError(f"{config} has {replaced} instance counts; expected 1")
        config.write_text(text)
    return target


def sweep(config: dict[str, Any], repository: Path, folder: Path) -> list[SweepPoint]:
    points = []
    for number, counts in enumerate(config["instances"]):
        served = with_instances(repository, folder / f"repository-{number}", counts)
        with TritonServer(served, log_path=folder / f"tritonserver-{number}.log") as server:
            host = server.grpc_url if config["protocol"] == "grpc" else server.http_url
            for users in config["users"]:
                run = LocustRun(
                    host, config["protocol"], config["scenario"], users, float(users), config["duration"], 1.0, 0.0
                )
                run_folder = folder / f"instances-{number}-users-{users}"
                run_folder.mkdir()
                before, started = scrape(server.metrics_url), time.monotonic()
                run_locust(run, run_folder)
                seconds = time.monotonic() - started
                counted = ensemble_requests(difference(scrape(server.metrics_url), before))
                totals = locust_totals(run_folder)
                points.append(
                    SweepPoint(
                        dict(counts), users, (totals.requests - totals.failures) / (seconds / 60.0), totals.p95_ms,
                        totals.failures, counted.total,
                    )
                )  # fmt: skip
                rate = points[-1].volumes_per_minute
                print(f"{counts} users={users}: {rate:.2f} volumes/min, p95 {totals.p95_ms:.0f} ms", flush=True)
        shutil.rmtree(served)
    return points


def report(points: list[SweepPoint], config: dict[str, Any]) -> str:
    lines = [
        f"# Sweep: {config['scenario']}, {config['protocol']}, {config['duration']} per point",
        "",
        "| segmenter × vision instances | users | volumes/min | p95 | failures | requests Triton counted |",
        "|---|---|---|---|---|---|",
    ]
    for point in points:
        instances = f"{point.instances.get('segmenter', 1)} × {point.instances.get('vision', 1)}"
        lines.append(
            f"| {instances} | {point.users} | {point.volumes_per_minute:.2f} | {point.p95_ms / 1000:.1f} s | "
            f"{point.failures} | {point.triton_requests:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[SweepPoint], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for instances in sorted({tuple(sorted(point.instances.items())) for point in points}):
        chosen = [point for point in points if tuple(sorted(point.instances.items())) == instances]
        label = " × ".join(f"{count} {model}" for model, count in instances)
        users = [point.users for point in chosen]
        throughput.plot(users, [point.volumes_per_minute for point in chosen], "o-", label=label)
        latency.plot(users, [point.p95_ms / 1000 for point in chosen], "s-", label=label)
    throughput.set(xlabel="concurrent users", ylabel="volumes/min", title="throughput")
    latency.set(xlabel="concurrent users", ylabel="p95 latency (s)", title="p95 latency")
    throughput.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser(PROG, "Sweep users and instance counts with Locust against the CPU server.", "")
    parser.add_argument("--config", type=Path, default=SWEEP_CONFIG, help="default loadtest/sweep.toml")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results root (default loadtest/results)")
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    args = parser.parse_args(argv)

    def body() -> int:
        config = tomllib.loads(args.config.read_text())
        settings = ExportSettings(checkpoint=args.checkpoint, repository=args.repository)
        if not repository_is_current(settings):
            build_repository(settings)
        folder = args.output / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(parents=True)
        points = sweep(config, args.repository, folder)
        text = report(points, config)
        (folder / "sweep.md").write_text(text)
        plot(points, folder / "sweep.png")
        print(f"{text}\n{PROG}: results in {folder}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
