"""benchmarks/capacity.py: runs in seconds, its measured inputs are the numbers RESULTS.md records, and its
autoscaler is the manifest's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("yaml")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import capacity  # noqa: E402  (a script folder, not a package)


def test_measured_service_times_are_the_ones_results_records() -> None:
    results = (BENCHMARKS / "RESULTS.md").read_text()
    for seconds, section in capacity.MEASURED_SERVICE_S.values():
        assert f"## {section.split(',')[0]}" in results, section
        assert f"{seconds:g}" in results, seconds


def test_the_autoscaler_is_read_from_the_manifest() -> None:
    autoscaler = capacity.Autoscaler.from_manifest()
    assert autoscaler.target_queue_s == 2.0 and autoscaler.max_replicas == 8
    assert autoscaler.down_window_s > autoscaler.up_window_s


def test_more_replicas_never_wait_longer_and_the_script_runs_in_seconds() -> None:
    import random

    arrivals = capacity.day_arrivals(200, random.Random(1))
    p95 = [
        float(capacity.np.percentile(capacity.simulate(arrivals, 283.0, 0.25, random.Random(1), r)["latency"], 95))
        for r in (1, 2, 4)
    ]
    assert p95[0] > p95[1] >= p95[2] >= 283.0 * 0.5
    measured, on_a_gpu = (capacity_output("--per-day", "100"), capacity_output("--gpu-service-s", "20"))
    assert "measured: nano" in measured and "NOT measured" not in measured
    assert "NOT measured here" in on_a_gpu


def capacity_output(*arguments: str) -> str:
    command = [sys.executable, str(BENCHMARKS / "capacity.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
