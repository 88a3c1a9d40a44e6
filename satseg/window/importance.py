"""Gaussian importance map that weights each window's prediction when blending."""

from __future__ import annotations

import torch
from monai.data.utils import compute_importance_map

from satseg.spec import DEFAULT_SIGMA_SCALE

IMPORTANCE_PEAK = 10.0
"""Largest weight, as in nnU-Net; also bounds every weighted probability added to an accumulator."""


def gaussian_importance_map(
    patch_size: tuple[int, int, int], device: torch.device | str = "cpu", sigma_scale: float = DEFAULT_SIGMA_SCALE
) -> torch.Tensor:
    """nnU-Net's blending weights: a Gaussian with ``sigma = sigma_scale * patch`` per axis (patch / 8), peak 10.

    MONAI centres the Gaussian exactly (nnU-Net puts the peak on voxel ``patch // 2``)
    and raises every weight to at least 1e-3 of the peak where nnU-Net only replaces
    exact zeros; that floor keeps the window corners above fp16's underflow when an
    fp16 accumulator adds ``weight * probability``.

    Args:
        patch_size: ``(h, w, d)`` window size in voxels.
        device: where the map lives.

    Returns:
        ``[h, w, d]`` float32, values in ``(0, 10]``, maximum exactly 10.
    """
    weights = compute_importance_map(
        patch_size, mode="gaussian", sigma_scale=sigma_scale, device=device, dtype=torch.float32
    )
    return weights.mul_(IMPORTANCE_PEAK / weights.max())
