"""The wire contract of the served ``sat`` ensemble: model and tensor names, request options, limits, error kinds.

It imports numpy only, so a client installs it without the engine (``satseg[client]``). The checks every
request goes through on the server live with the models (:mod:`satseg.triton_models.requests`); each refusal
is a :class:`SatInputError` whose one-line message says what was wrong and what is accepted, answered as
``INVALID_ARG`` for that request alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from satseg.errors import SatInputError

# The models of the repository: clients call ENTRY_MODEL; the others are its steps and their runtimes.
ENTRY_MODEL = "sat"
CONTRACT_FILE = "metadata.json"
"""The served contract, written by ``sat-export`` into the entry model's folder; ``MODEL`` is its sha256."""
PROMPT_ENCODER_MODEL = "prompt_encoder"
"""The ensemble's first step (prompts in, queries and ``MODEL`` out): asked alone for the model's hash."""
SEGMENTER_MODEL = "segmenter"
VISION_MODEL = "vision"
TEXT_ENCODER_MODEL = "text_encoder"
MODELS = (ENTRY_MODEL, PROMPT_ENCODER_MODEL, SEGMENTER_MODEL, VISION_MODEL, TEXT_ENCODER_MODEL)

# Endpoints.
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
ADMIN_HEADER = "sat-admin-key"
"""The header that opens the restricted endpoints (shared memory, statistics, repository control)."""
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
"""gRPC clients send the key under this name: Triton prefixes restricted-protocol headers on gRPC."""
ADMIN_KEY_VARIABLE = "SAT_ADMIN_KEY"
"""The environment variable that holds the admin key, for the server and its clients."""

# Error kinds, as Triton's statuses name them.
REFUSED_STATUSES = ("INVALID_ARG", "400")
"""A request the server refused: the same request would be refused again, so never retried."""
OVER_LIMIT_STATUSES = ("RESOURCE_EXHAUSTED", "413")
"""A message over a size limit (gRPC's message or metadata caps, a proxy's body cap): not an outage, never
retried."""
UNAVAILABLE_FAILURES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "503", "timed out", "Connection refused", "reset by peer")
"""Failures worth a retry: the server is starting, restarting or overloaded."""

# Limits.
DEFAULT_MAX_VOXELS = 512 * 512 * 1000
"""The largest volume accepted anywhere (files, clients, server): a whole-body CT at 512x512x1000."""
DEFAULT_MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 1024
"""The longest prompt accepted: far longer than any anatomical term or description, short of a pasted report.
Mask file names stay bounded whatever the length (``satseg.outputs.writer.mask_file_name``)."""

# Tensor names of the ensemble (clients/ and loadtest/ use these too).
IMAGE = "IMAGE"
IMAGE_INT16 = "IMAGE_INT16"
AFFINE = "AFFINE"
MODALITY = "MODALITY"
PROMPTS = "PROMPTS"
MASKS = "MASKS"
LABELMAP = "LABELMAP"
LABELS = "LABELS"
VOLUMES_ML = "VOLUMES_ML"
MODEL = "MODEL"
"""sha256 of the repository's ``sat/metadata.json``: which export (weights, graphs, vocabulary) answered."""
SPEC = "SPEC"
"""``[1]`` BYTES from ``prompt_encoder``: the served model spec (:class:`~satseg.spec.ModelSpec` as JSON)."""
WARNINGS = "WARNINGS"
"""``[W]`` BYTES, one line each: what the answer should be read with (prompts outside the trained terms)."""
STATISTICS = "STATISTICS"
"""``[N]`` BYTES, one JSON object per term: its :func:`~satseg.outputs.statistics.mask_statistics`."""
MODEL_GRID = "MODEL_GRID"
"""``[3]`` int32: the model grid the windows slid on (the spec's spacing and crop applied to this volume)."""
# Between the ensemble's steps.
QUERIES = "QUERIES"
PROMPT_INDEX = "PROMPT_INDEX"
SINGLE_COMPONENT = "SINGLE_COMPONENT"
"""``[M]`` bool per query row: the vocabulary's one-connected-body flag (the mask keeps its largest piece)."""

OUTPUT_MASKS = "masks"
OUTPUT_LABELMAP = "labelmap"
OUTPUT_BOTH = "both"
OUTPUT_CHOICES = (OUTPUT_MASKS, OUTPUT_LABELMAP, OUTPUT_BOTH)


@dataclass(frozen=True)
class ServingLimits:
    """Caps from the model config's ``parameters`` (``max_voxels``, ``max_prompts``, ``allow_free_text``)."""

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_prompts: int = DEFAULT_MAX_PROMPTS
    allow_free_text: bool = False

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> ServingLimits:
        return cls(
            max_voxels=int(parameters.get("max_voxels", DEFAULT_MAX_VOXELS)),
            max_prompts=int(parameters.get("max_prompts", DEFAULT_MAX_PROMPTS)),
            allow_free_text=parameters.get("allow_free_text", "false").lower() in ("1", "true", "yes"),
        )


MAX_OVERLAP = 0.9
"""Above it, windows nearly coincide: the cost grows without bound for no gain."""


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options, sent as request parameters (``OPTIONS`` in the contract).

    Attributes:
        output: ``"masks"`` (``MASKS`` ``[N, I, J, K]``, ``LABELMAP`` empty), ``"labelmap"`` (the reverse) or
            ``"both"``.
        threshold: a voxel is in a mask where its probability exceeds this, in ``(0, 1)``; ``None``: the
            model spec's.
        overlap: sliding-window overlap in ``[0, MAX_OVERLAP]``; ``None``: the model spec's.
    """

    output: str = OUTPUT_MASKS
    threshold: float | None = None
    overlap: float | None = None

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> RequestOptions:
        """Parse request parameters; unknown keys are refused so a typo never silently uses a default."""
        known = {"output", "threshold", "overlap"}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise SatInputError(f"unknown request parameter(s) {unknown}; accepted: {', '.join(sorted(known))}")
        output = str(parameters.get("output", OUTPUT_MASKS)).lower()
        if output not in OUTPUT_CHOICES:
            raise SatInputError(f'output "{output}" is not accepted; use one of {", ".join(OUTPUT_CHOICES)}')
        threshold = _number(parameters, "threshold")
        if threshold is not None:
            check_threshold(threshold)
        overlap = _number(parameters, "overlap")
        if overlap is not None:
            check_overlap(overlap)
        return cls(output=output, threshold=threshold, overlap=overlap)


def check_threshold(value: float, name: str = "threshold") -> None:
    """Refuse a probability threshold outside ``(0, 1)`` (``name`` is how the caller calls it)."""
    if not 0.0 < value < 1.0:
        raise SatInputError(f"{name} {value} is outside (0, 1)")


def check_overlap(value: float, name: str = "overlap") -> None:
    """Refuse a sliding-window overlap outside ``[0, MAX_OVERLAP]`` (``name`` is how the caller calls it)."""
    if not 0.0 <= value <= MAX_OVERLAP:
        raise SatInputError(f"{name} {value} is outside [0, {MAX_OVERLAP}]")


def _number(parameters: Mapping[str, Any], key: str) -> float | None:
    """A numeric request parameter, or ``None`` where the request leaves it to the model spec."""
    if key not in parameters:
        return None
    value = parameters[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SatInputError(f"request parameter {key}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise SatInputError(f"request parameter {key}={value!r} is not a finite number")
    return number


def parse_parameters(text: str) -> dict[str, Any]:
    """Triton's request parameters (a JSON object string in the python backend)."""
    try:
        parameters = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise SatInputError("request parameters are not valid JSON") from None
    if not isinstance(parameters, dict):
        raise SatInputError("request parameters must be a JSON object")
    return parameters


def decode_strings(array: np.ndarray, name: str) -> list[str]:
    """A BYTES tensor as UTF-8 strings."""
    try:
        return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
    except UnicodeDecodeError:
        raise SatInputError(f"{name} holds bytes that are not UTF-8 text") from None


def prompt_index(counts: Sequence[int]) -> np.ndarray:
    """``[M]`` int32: the prompt each query row belongs to, for ``counts[i]`` rows of prompt ``i``."""
    return np.repeat(np.arange(len(counts), dtype=np.int32), counts)


def component_counts(index: np.ndarray) -> list[int]:
    """The inverse of :func:`prompt_index`: rows per prompt, checked to be contiguous and in order."""
    index = np.asarray(index).reshape(-1)
    if index.size == 0 or index[0] != 0 or np.any(np.diff(index) < 0) or np.any(np.diff(index) > 1):
        raise SatInputError(f"{PROMPT_INDEX} must run 0, 0, 1, 2, 2, ... with every prompt present")
    return np.bincount(index).tolist()


def strings(items: Iterable[str]) -> np.ndarray:
    """A BYTES tensor ``[N]`` of UTF-8 ``items``."""
    return np.array([item.encode("utf-8") for item in items], dtype=np.object_)
