"""Locust users that send synthetic CTs to the served ``sat`` ensemble through ``tritonclient``.

Run through ``sat-loadtest`` (``just loadtest``), which starts the server, scrapes Triton's metrics and
writes the reports; or by hand: ``locust -f loadtest/locustfile.py --host 127.0.0.1:8000 --scenario mixed``.

Every request fires Locust's request event with its latency, the bytes of its answer and any exception.
In ``bad_inputs``, a malformed request succeeds when the server rejects it with INVALID_ARG (reported
under its own name) and fails when it is accepted; valid requests must all succeed.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locust import User, between, events, task
from locust.env import Environment

from satseg import contract
from satseg_clients.sat_client import infer_inputs, request_arrays, wire_image
from satseg_loadtest.scenarios import MALFORMED_SHARE, SCENARIOS, RequestKind, mix_weights

PROTOCOLS = ("http", "grpc")


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="ct_small", help="what users send")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http", help="tritonclient protocol")
    parser.add_argument("--max-fail-ratio", type=float, default=0.0, help="exit 1 above this failure ratio")
    parser.add_argument("--max-p95-ms", type=float, default=0.0, help="exit 1 above this p95 latency (0: off)")
    parser.add_argument(
        "--malformed-share", type=float, default=MALFORMED_SHARE, help="bad_inputs: share of malformed requests"
    )
    parser.add_argument("--totals-json", default="", help="write the final totals here (after in-flight requests)")


@events.init.add_listener
def patch_grpc_for_gevent(environment: Environment, **_: Any) -> None:
    """gRPC under gevent needs this before any channel exists, else calls run one at a time."""
    if environment.parsed_options and environment.parsed_options.protocol == "grpc":
        import grpc.experimental.gevent

        grpc.experimental.gevent.init_gevent()


@events.quitting.add_listener
def apply_thresholds(environment: Environment, **_: Any) -> None:
    """The pass/fail gate: Locust's exit code is 1 when the failure ratio or p95 exceeds its threshold.

    Also writes the final totals (``--totals-json``): Locust's CSV can be written before the requests still
    in flight at the end have finished; these numbers are taken after they have.
    """
    options, total = environment.parsed_options, environment.stats.total
    if options is None:
        return
    p95 = total.get_response_time_percentile(0.95) or 0.0
    if options.totals_json:
        write_totals(environment, Path(options.totals_json))
    if total.fail_ratio > options.max_fail_ratio:
        print(f"threshold: failure ratio {total.fail_ratio:.2%} > {options.max_fail_ratio:.2%}")
        environment.process_exit_code = 1
    elif options.max_p95_ms and p95 > options.max_p95_ms:
        print(f"threshold: p95 {p95:.0f} ms > {options.max_p95_ms:.0f} ms")
        environment.process_exit_code = 1


def write_totals(environment: Environment, path: Path) -> None:
    """Per request name and in total: count, failures, mean and percentiles (ms)."""

    def numbers(entry: Any) -> dict[str, float]:
        percentiles = {f"p{int(q * 100)}": entry.get_response_time_percentile(q) or 0.0 for q in (0.5, 0.95, 0.99)}
        return {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "mean_ms": entry.avg_response_time,
            **percentiles,
        }

    entries = {name: numbers(entry) for (name, _), entry in environment.stats.entries.items()}
    path.write_text(json.dumps({"total": numbers(environment.stats.total), "by_name": entries}, indent=2))


@dataclass(frozen=True)
class PreparedRequest:
    """A request kind's tensors, built once per user and sent as they are."""

    kind: RequestKind
    inputs: list[Any]


def prepare(module: Any, kind: RequestKind) -> PreparedRequest:
    volume = kind.volume()
    arrays = request_arrays(wire_image(volume.array, "ct"), volume.affine, "ct", kind.prompts)
    return PreparedRequest(kind, infer_inputs(module, arrays))


def is_invalid_argument(error: Exception) -> bool:
    """Whether the server refused the request as malformed (gRPC INVALID_ARGUMENT, HTTP 400)."""
    status = str(getattr(error, "status", lambda: "")())
    return "INVALID_ARG" in status or status == "400"


class SATUser(User):
    """One scripted client: a request of its scenario's mix, one after another, with a short think time."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.protocol = options.protocol
        if self.protocol == "grpc":
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(self.host)
        else:
            import tritonclient.http as module

            self.client = module.InferenceServerClient(self.host, network_timeout=900.0, connection_timeout=900.0)
        mix = SCENARIOS[options.scenario]
        self.weights = mix_weights(mix, options.malformed_share)
        self.requests = [prepare(module, kind) for _, kind in mix]

    @task
    def segment(self) -> None:
        request = random.choices(self.requests, weights=self.weights)[0]
        started = time.perf_counter()
        length, exception = 0, None
        try:
            result = self.client.infer(contract.ENTRY_MODEL, request.inputs)
            length = sum(result.as_numpy(name).nbytes for name in (contract.MASKS, contract.LABELMAP))
            if request.kind.malformed:
                exception = AssertionError("a malformed request was accepted")
        except Exception as error:  # every failure is reported to Locust, never raised
            exception = None if request.kind.malformed and is_invalid_argument(error) else error
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=f"{request.kind.name} (rejected as expected)" if request.kind.malformed else request.kind.name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )

    def on_stop(self) -> None:
        self.client.close()
