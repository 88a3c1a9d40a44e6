"""Dice and normalised surface Dice (NSD) of two masks."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_TOLERANCE_MM = 2.0


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    """``2 |P & T| / (|P| + |T|)`` of two boolean masks of one shape, in [0, 1]; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def surface_dice(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float = DEFAULT_TOLERANCE_MM
) -> float:
    """Normalised surface Dice of two boolean ``[I, J, K]`` masks, in [0, 1].

    The fraction of both surfaces (weighted by surface area, DeepMind's surface elements via MONAI's
    ``use_subvoxels``) lying within ``tolerance_mm`` of the other surface, distances in mm with the voxel
    ``spacing``. 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    from monai.metrics import compute_surface_dice  # slow import, only needed here

    if not prediction.any() or not truth.any():
        return float(prediction.any() == truth.any())
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated argument internally; nothing for a caller to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        value = compute_surface_dice(
            torch.from_numpy(np.ascontiguousarray(prediction))[None, None],
            torch.from_numpy(np.ascontiguousarray(truth))[None, None],
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            spacing=[float(size) for size in spacing],
            use_subvoxels=True,
        )
    return float(value[0, 0])
