"""Gaussian importance map that weights each window's prediction when blending."""

from __future__ import annotations

import torch

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
    # MONAI's compute_importance_map(mode="gaussian") step for step (a test checks they are equal), without
    # importing MONAI, which loads all of it (3.8 s a process).
    profiles = []
    for size in patch_size:
        offsets = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float, device=device)
        profiles.append(torch.exp(offsets**2 / (-2 * (size * sigma_scale) ** 2)))
    weights = profiles[0]
    for axis, profile in enumerate(profiles[1:], start=1):
        weights = weights.unsqueeze(-1) * profile[(None,) * axis]
    weights = weights.clamp_(min=max(weights.min().item(), 1e-3))
    return weights.mul_(IMPORTANCE_PEAK / weights.max())
