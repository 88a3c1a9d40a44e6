"""Triton's Prometheus metrics (``:8002/metrics``): scraped before and after a load test, then differenced.

Parsed by hand: the exposition format of Triton's counters is one ``name{labels} value`` per line, and ten
lines of parsing spare the load test a dependency.
"""

from __future__ import annotations

import re
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from satseg.contract import ENTRY_MODEL, PROMPT_ENCODER_MODEL

LINE = re.compile(r"^(?P<name>nv_inference_[a-z_]+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
MODEL_LABEL = re.compile(r'model="(?P<model>[^"]+)"')
Counters = dict[str, dict[str, float]]
"""metric name -> model -> value (summed over versions and other labels)."""


def parse_metrics(text: str) -> Counters:
    counters: Counters = defaultdict(lambda: defaultdict(float))
    for line in text.splitlines():
        match = LINE.match(line.strip())
        model = MODEL_LABEL.search(match["labels"]) if match else None
        if match and model:
            counters[match["name"]][model["model"]] += float(match["value"])
    return counters


def scrape(url: str) -> Counters:
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_metrics(response.read().decode())


def difference(after: Counters, before: Counters) -> Counters:
    return {
        name: {model: value - before.get(name, {}).get(model, 0.0) for model, value in models.items()}
        for name, models in after.items()
    }


@dataclass(frozen=True)
class ModelWindow:
    """One model's counters over the test window."""

    success: float
    failure: float
    request_ms: float
    queue_ms: float
    compute_ms: float

    @property
    def mean_request_ms(self) -> float:
        return self.request_ms / self.success if self.success else 0.0


def model_window(delta: Counters, model: str) -> ModelWindow:
    """Counts, and cumulative milliseconds, of ``model`` over the window."""

    def total(name: str) -> float:
        return delta.get(name, {}).get(model, 0.0)

    return ModelWindow(
        success=total("nv_inference_request_success"),
        failure=total("nv_inference_request_failure"),
        request_ms=total("nv_inference_request_duration_us") / 1000.0,
        queue_ms=total("nv_inference_queue_duration_us") / 1000.0,
        compute_ms=total("nv_inference_compute_infer_duration_us") / 1000.0,
    )


@dataclass(frozen=True)
class EnsembleRequests:
    """Requests the ``sat`` ensemble answered over the window: successes and refusals."""

    succeeded: float
    refused: float

    @property
    def total(self) -> float:
        return self.succeeded + self.refused


def ensemble_requests(
    delta: Counters, ensemble: str = ENTRY_MODEL, first_step: str = PROMPT_ENCODER_MODEL
) -> EnsembleRequests:
    """Counted from the ensemble's successes and its first step's requests, not its failure counter.

    Triton 2.51 counts each failed ensemble request twice in ``nv_inference_request_failure`` (measured: one
    malformed request, failure count 2), while a python model that answers with an error counts a success.
    Every request reaches the first step, so its count is the ensemble's request count.
    """
    entered = model_window(delta, first_step)
    succeeded = model_window(delta, ensemble).success
    return EnsembleRequests(succeeded, max(entered.success + entered.failure - succeeded, 0.0))
