"""The checks every request to the served models goes through, before any model runs.

Pure functions on numpy arrays (tested without a server), applying the rules every entry point shares
(:func:`~satseg.geometry.io.validate_volume`, :func:`~satseg.text.vocabulary.check_prompts`).
"""

from __future__ import annotations

import numpy as np

from satseg.contract import AFFINE, IMAGE, IMAGE_INT16, MODALITY, PROMPTS, ServingLimits, decode_strings
from satseg.errors import SatInputError
from satseg.geometry.io import check_intensities, validate_volume
from satseg.geometry.volume import Volume, check_modality
from satseg.text.vocabulary import check_prompts


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
