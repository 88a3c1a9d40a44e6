"""Capacity of a SAT deployment from measured service times: replicas, p95 latency and the autoscaler.

A discrete-event simulation of one queue in front of ``R`` servers that each run one volume at a time (the
load-test sweep in RESULTS.md: a second instance on the same cores does not raise the plateau). For:

1. a day of CT arrivals (Poisson, ``--per-day`` with a morning peak): p95 latency per fixed replica count,
   and the fewest replicas whose p95 meets ``--p95-goal-s``;
2. a retrospective batch (``--batch`` volumes, all queued at once): hours to finish per replica count;
3. the same day under the HorizontalPodAutoscaler of ``deploy/k8s/base/hpa.yaml`` (its target, limits,
   stabilisation windows and rate policies read from the manifest): replicas over time, time to scale at
   the peak, the longest queue and the p95.

Service times are measured ones (RESULTS.md, named in the output); a number not measured here (a GPU's, the
spread of service times, a pod's start-up) is a parameter, and the output says so.

    python benchmarks/capacity.py [--service-s 282.9] [--per-day 200] [--gpu-service-s S]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
HPA_MANIFEST = HERE.parent / "deploy" / "k8s" / "base" / "hpa.yaml"
"""The GPU servers' autoscaler; the cpu overlay patches its target to a minute (--hpa-target-s 60)."""
MEASURED_SERVICE_S = {
    # name: (seconds per volume on one server, where RESULTS.md records it)
    "nano, abdominal CT, OpenVINO FP32, 2-core EPYC": (282.9, "SAT end to end against the reference algorithm"),
    "demo (tiny), ct_small, pip Triton CPU, 2-core Xeon": (8.3, "Load-test sweep, 1 x 1, 1 user"),
}
DEFAULT_SERVICE = "nano, abdominal CT, OpenVINO FP32, 2-core EPYC"
HOURLY_SHARE = np.array([1, 1, 1, 1, 1, 1, 2, 6, 12, 12, 10, 8, 6, 6, 6, 5, 5, 4, 3, 3, 2, 2, 1, 1], dtype=float)
"""Arrivals per hour of a department's day, relative (a morning peak from 8 to 11): an assumption."""
HOURLY_SHARE /= HOURLY_SHARE.sum()


@dataclass(frozen=True)
class Autoscaler:
    """The HPA's rule: desired = ceil(replicas * metric / target), within its limits and policies."""

    target_queue_s: float
    min_replicas: int
    max_replicas: int
    up_window_s: float
    up_pods: int
    up_period_s: float
    down_window_s: float
    down_pods: int
    down_period_s: float

    @classmethod
    def from_manifest(cls, path: Path = HPA_MANIFEST) -> Autoscaler:
        spec = yaml.safe_load(path.read_text())["spec"]
        (metric,) = spec["metrics"]
        up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
        (up_policy,), (down_policy,) = up["policies"], down["policies"]
        return cls(
            target_queue_s=float(metric["pods"]["target"]["averageValue"]) / 1000,
            min_replicas=spec["minReplicas"],
            max_replicas=spec["maxReplicas"],
            up_window_s=up["stabilizationWindowSeconds"],
            up_pods=up_policy["value"],
            up_period_s=up_policy["periodSeconds"],
            down_window_s=down["stabilizationWindowSeconds"],
            down_pods=down_policy["value"],
            down_period_s=down_policy["periodSeconds"],
        )


def day_arrivals(per_day: float, rng: random.Random, days: int = 1) -> list[float]:
    """Poisson arrival times (s) over ``days`` with :data:`HOURLY_SHARE` of ``per_day`` in each hour."""
    times = []
    for hour in range(24 * days):
        rate = per_day * HOURLY_SHARE[hour % 24] / 3600
        t = hour * 3600.0
        while True:
            t += rng.expovariate(rate)
            if t >= (hour + 1) * 3600:
                break
            times.append(t)
    return times


def service_time(mean_s: float, cv: float, rng: random.Random) -> float:
    """A gamma-distributed service time with mean ``mean_s`` and coefficient of variation ``cv``."""
    if cv <= 0:
        return mean_s
    shape = 1 / cv**2
    return rng.gammavariate(shape, mean_s / shape)


def simulate(
    arrivals: list[float],
    mean_s: float,
    cv: float,
    rng: random.Random,
    replicas: int,
    autoscaler: Autoscaler | None = None,
    startup_s: float = 0.0,
    tick_s: float = 15.0,
) -> dict[str, object]:
    """FIFO queue, ``replicas`` servers (or the autoscaler's); latencies (s), replicas over time, longest queue.

    An event loop over a heap (arrival, done, autoscaler tick): simpler here than a simulation framework.
    A scaled-down server finishes its volume first (terminationGracePeriodSeconds covers it).
    """
    events: list[tuple[float, int, str, int]] = [(t, i, "arrive", i) for i, t in enumerate(arrivals)]
    heapq.heapify(events)
    counter = len(arrivals)
    queue: list[int] = []
    waits: list[tuple[float, float]] = []  # (time started, seconds waited), for the HPA's metric
    latency = [math.nan] * len(arrivals)
    ready, busy, starting = replicas, 0, 0
    desired_history: list[tuple[float, int]] = []
    timeline: list[tuple[float, int]] = [(0.0, replicas)]
    last_up = last_down = -math.inf
    longest = 0
    if autoscaler is not None:
        heapq.heappush(events, (0.0, counter, "tick", 0))
        counter += 1

    def start_next(now: float) -> None:
        nonlocal busy, counter
        while queue and busy < ready:
            job = queue.pop(0)
            busy += 1
            waits.append((now, now - arrivals[job]))
            heapq.heappush(events, (now + service_time(mean_s, cv, rng), counter, "done", job))
            counter += 1

    while events:
        now, _, kind, job = heapq.heappop(events)
        if kind == "arrive":
            queue.append(job)
            longest = max(longest, len(queue))
        elif kind == "done":
            busy -= 1
            latency[job] = now - arrivals[job]
        elif kind == "started":
            starting -= 1
            ready += 1
            timeline.append((now, ready))
        elif kind == "tick" and autoscaler is not None:
            recent = [wait for started, wait in waits if started > now - 60]
            queued = [now - arrivals[j] for j in queue]
            metric = float(np.mean(recent + queued)) if recent or queued else 0.0
            current = ready + starting
            desired = min(
                max(math.ceil(current * metric / autoscaler.target_queue_s), autoscaler.min_replicas),
                autoscaler.max_replicas,
            )
            desired_history.append((now, desired))
            up_recommend = min(d for t, d in desired_history if t > now - autoscaler.up_window_s)
            down_recommend = max(d for t, d in desired_history if t > now - autoscaler.down_window_s)
            if up_recommend > current and now - last_up >= autoscaler.up_period_s:
                for _ in range(min(autoscaler.up_pods, up_recommend - current)):
                    starting += 1
                    heapq.heappush(events, (now + startup_s, counter, "started", 0))
                    counter += 1
                last_up = now
            elif down_recommend < current and now - last_down >= autoscaler.down_period_s and starting == 0:
                ready -= min(autoscaler.down_pods, current - down_recommend)
                timeline.append((now, ready))
                last_down = now
            if any(kind != "tick" for _, _, kind, _ in events) or queue or busy:
                heapq.heappush(events, (now + tick_s, counter, "tick", 0))
                counter += 1
        start_next(now)
    done = np.array([value for value in latency if not math.isnan(value)])
    return {"latency": done, "timeline": timeline, "longest_queue": longest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", choices=tuple(MEASURED_SERVICE_S), default=DEFAULT_SERVICE)
    parser.add_argument("--gpu-service-s", type=float, help="seconds per volume on one GPU server (not measured here)")
    parser.add_argument("--service-cv", type=float, default=0.25, help="spread of service times (assumed, 0.25)")
    parser.add_argument("--per-day", type=float, default=200, help="CTs a day (default 200)")
    parser.add_argument("--p95-goal-s", type=float, default=3600, help="p95 latency goal (default one hour)")
    parser.add_argument("--batch", type=int, default=10_000, help="volumes of a retrospective batch")
    parser.add_argument("--startup-s", type=float, default=300, help="a new pod's time to ready (assumed, 300)")
    parser.add_argument("--hpa-target-s", type=float, help="the HPA's queue target instead of the manifest's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.gpu_service_s is not None:
        mean_s, source = args.gpu_service_s, "given with --gpu-service-s: NOT measured here"
    else:
        mean_s, section = MEASURED_SERVICE_S[args.service]
        source = f"measured: {args.service} (RESULTS.md, {section})"
    print(f"service time {mean_s:g} s per volume, {source}")
    print(f"spread (coefficient of variation) {args.service_cv:g}: assumed; pod start-up {args.startup_s:g} s: assumed")
    print(f"arrivals: {args.per_day:g} a day, Poisson, morning peak {HOURLY_SHARE.max() * args.per_day:.0f}/h: assumed")
    arrivals = day_arrivals(args.per_day, random.Random(args.seed))
    print(f"\n1. A day ({len(arrivals)} volumes), fixed replicas:\n")
    print("| replicas | p95 latency | mean latency | longest queue |")
    print("|---:|---:|---:|---:|")
    offered = args.per_day * mean_s / 86400
    fewest = None
    for replicas in range(max(1, math.ceil(offered)), max(2, math.ceil(offered)) + 8):
        result = simulate(arrivals, mean_s, args.service_cv, random.Random(args.seed), replicas)
        p95 = float(np.percentile(result["latency"], 95))
        print(
            f"| {replicas} | {p95 / 60:.1f} min | {result['latency'].mean() / 60:.1f} min | {result['longest_queue']} |"
        )
        if fewest is None and p95 <= args.p95_goal_s:
            fewest = replicas
    print(f"\nfewest replicas with p95 <= {args.p95_goal_s / 60:g} min: {fewest or 'more than shown'}")
    print(f"\n2. A batch of {args.batch} volumes queued at once:\n")
    print("| replicas | hours to finish |")
    print("|---:|---:|")
    for replicas in (1, 2, 4, 8, 16):
        print(f"| {replicas} | {args.batch * mean_s / replicas / 3600:.1f} |")
    autoscaler = Autoscaler.from_manifest()
    if args.hpa_target_s is not None:
        autoscaler = replace(autoscaler, target_queue_s=args.hpa_target_s)
    result = simulate(
        arrivals, mean_s, args.service_cv, random.Random(args.seed), autoscaler.min_replicas, autoscaler, args.startup_s
    )
    timeline = result["timeline"]
    peak_replicas = max(replicas for _, replicas in timeline)
    first_up = next((t for t, replicas in timeline if replicas > autoscaler.min_replicas), None)
    print(
        f"\n3. The same day under the HPA of {HPA_MANIFEST.relative_to(HERE.parent)} (queue target "
        f"{autoscaler.target_queue_s:g} s, {autoscaler.min_replicas}-{autoscaler.max_replicas} replicas):\n"
    )
    print(f"- first scale-up at {first_up / 3600:.2f} h" if first_up is not None else "- never scaled up")
    print(f"- most replicas: {peak_replicas}; longest queue: {result['longest_queue']} volumes")
    latency = result["latency"]
    print(f"- p95 latency {np.percentile(latency, 95) / 60:.1f} min, mean {latency.mean() / 60:.1f} min")
    print("- replicas over the day (h: replicas): " + ", ".join(f"{t / 3600:.1f}: {r}" for t, r in timeline[:24]))


if __name__ == "__main__":
    main()
