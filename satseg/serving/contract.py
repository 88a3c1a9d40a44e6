"""What the served ``sat`` ensemble accepts and returns, and the checks every request goes through.

Pure functions on numpy arrays, so the Triton models stay thin and everything here is tested without a
server. Every refusal is a :class:`SatInputError` whose one-line message says what was wrong and what is
accepted; the models answer it as ``INVALID_ARG`` for that request alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from satseg.errors import SatInputError
from satseg.geometry import Volume, validate_volume
from satseg.geometry.io import DEFAULT_MAX_VOXELS, check_intensities
from satseg.geometry.volume import check_modality
from satseg.text.vocabulary import check_prompts

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
WARNINGS = "WARNINGS"
"""``[W]`` BYTES, one line each: what the answer should be read with (prompts outside the trained terms)."""
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
DEFAULT_MAX_PROMPTS = 64


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


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options, sent as request parameters (``OPTIONS`` in the contract).

    Attributes:
        output: ``"masks"`` (``MASKS`` ``[N, I, J, K]``, ``LABELMAP`` empty), ``"labelmap"`` (the reverse) or
            ``"both"``.
        threshold: a voxel is in a mask where its probability exceeds this, in ``(0, 1)``; ``None``: the
            model spec's.
        overlap: sliding-window overlap in ``[0, 0.9]``; ``None``: the model spec's.
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
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise SatInputError(f"threshold {threshold} is outside (0, 1)")
        overlap = _number(parameters, "overlap")
        if overlap is not None and not 0.0 <= overlap <= 0.9:
            raise SatInputError(f"overlap {overlap} is outside [0, 0.9]")
        return cls(output=output, threshold=threshold, overlap=overlap)


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


def request_modality(array: np.ndarray) -> str:
    """The one modality name of a ``MODALITY`` tensor."""
    values = decode_strings(array, MODALITY)
    if len(values) != 1:
        raise SatInputError(f"{MODALITY} must hold exactly one name, got {len(values)}")
    return check_modality(values[0])


def request_prompts(array: np.ndarray, limits: ServingLimits) -> list[str]:
    """The prompts of a ``PROMPTS`` tensor, by the rule every entry point applies (:func:`check_prompts`)."""
    return check_prompts(decode_strings(array, PROMPTS), limits.max_prompts)


def pick_image(image: np.ndarray | None, image_int16: np.ndarray | None) -> np.ndarray:
    """The one image of a request: ``IMAGE`` (FP32) or ``IMAGE_INT16`` (CT in HU), never both or neither."""
    if (image is None) == (image_int16 is None):
        raise SatInputError(f"send exactly one of {IMAGE} (FP32) and {IMAGE_INT16} (INT16, e.g. CT in HU)")
    return image if image is not None else image_int16  # type: ignore[return-value]


def request_volume(image: np.ndarray, affine: np.ndarray, modality: str, limits: ServingLimits) -> Volume:
    """Validate one request's image and affine (shape, finite values, voxel cap, spacing, invertibility, HU).

    Args:
        image: ``[I, J, K]`` int16 or float32, in the stored voxel order.
        affine: ``[4, 4]`` float64 voxel -> RAS+ mm.
        modality: canonical modality name.
        limits: the voxel cap.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise SatInputError(f"{AFFINE} must be [4, 4], got {list(affine.shape)}")
    if image.ndim != 3:
        raise SatInputError(f"{IMAGE} must be 3D [I, J, K], got shape {list(image.shape)}")
    volume = validate_volume(Volume(image, affine, modality), max_voxels=limits.max_voxels)
    check_intensities(volume.array, modality)
    return volume


def prompt_index(counts: Sequence[int]) -> np.ndarray:
    """``[M]`` int32: the prompt each query row belongs to, for ``counts[i]`` rows of prompt ``i``."""
    return np.repeat(np.arange(len(counts), dtype=np.int32), counts)


def component_counts(index: np.ndarray) -> list[int]:
    """The inverse of :func:`prompt_index`: rows per prompt, checked to be contiguous and in order."""
    index = np.asarray(index).reshape(-1)
    if index.size == 0 or index[0] != 0 or np.any(np.diff(index) < 0) or np.any(np.diff(index) > 1):
        raise SatInputError(f"{PROMPT_INDEX} must run 0, 0, 1, 2, 2, ... with every prompt present")
    return np.bincount(index).tolist()
