"""Segmentation losses: Dice + BCE per (sample, prompt), with deep supervision at /2, /4 and /8.

Every function is pure: tensors in, tensors out. Shapes use ``B`` samples, ``N`` prompts per sample
(padded to the batch's largest N; ``valid [B, N]`` marks the real ones) and a spatial grid ``[H, W, D]``.
Losses are computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

DEEP_SUPERVISION_WEIGHTS: tuple[float, ...] = (1.0, 1 / 2, 1 / 4, 1 / 8)
"""Weights of the full-resolution output and the /2, /4, /8 outputs, normalised over those present."""
DICE_SMOOTH = 1.0
"""Added to the Dice numerator and denominator (in voxels): an empty target predicted empty costs 0."""


@dataclass(frozen=True)
class LossTerms:
    """Scalar losses (float32, 0-d): ``total = dice + bce``, each averaged over the valid prompts."""

    total: torch.Tensor
    dice: torch.Tensor
    bce: torch.Tensor


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per (sample, prompt), ``p = sigmoid(logits)``.

    Args:
        logits: ``[B, N, *spatial]`` any float dtype.
        targets: ``[B, N, *spatial]`` binary (any dtype), same shape.
        smooth: ``s`` above, in voxels.

    Returns:
        ``[B, N]`` float32 in [0, 1].
    """
    probabilities = torch.sigmoid(logits.float()).flatten(2)
    targets = targets.float().flatten(2)
    overlap = (probabilities * targets).sum(-1)
    total = probabilities.sum(-1) + targets.sum(-1)
    return 1.0 - (2.0 * overlap + smooth) / (total + smooth)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over voxels, per (sample, prompt).

    Args:
        logits: ``[B, N, *spatial]`` any float dtype.
        targets: ``[B, N, *spatial]`` binary (any dtype), same shape.

    Returns:
        ``[B, N]`` float32, >= 0.
    """
    voxelwise = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return voxelwise.flatten(2).mean(-1)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B, N]`` over the entries where ``valid [B, N]`` (bool) is true; 0 if none is."""
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def downsample_targets(targets: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Binary ``targets [B, N, H, W, D]`` max-pooled to ``[B, N, *spatial_shape]`` (float32, 0 or 1).

    Max-pooling (a coarse voxel is positive when any voxel under it is) keeps structures smaller than
    the coarse voxel visible to the deep-supervision heads, and its windows coincide with the strided
    convolutions that produced the coarse features, so there is no half-voxel shift as with nearest.
    Each size must divide the target's.
    """
    batch, prompts, *full = targets.shape
    if list(full) == list(spatial_shape):
        return targets.float()
    kernel = tuple(size // coarse for size, coarse in zip(full, spatial_shape, strict=True))
    pooled = F.max_pool3d(targets.float().reshape(batch * prompts, 1, *full), kernel_size=kernel, stride=kernel)
    return pooled.reshape(batch, prompts, *spatial_shape)


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> LossTerms:
    """Dice + BCE of one output scale, averaged over the valid (sample, prompt) pairs.

    Args:
        logits: ``[B, N, H, W, D]``.
        targets: ``[B, N, H, W, D]`` binary, same shape.
        valid: ``[B, N]`` bool; padding prompts (False) contribute nothing, gradients included.
    """
    dice = masked_mean(soft_dice_loss(logits, targets), valid)
    bce = masked_mean(bce_loss(logits, targets), valid)
    return LossTerms(total=dice + bce, dice=dice, bce=bce)


def deep_supervision_loss(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor,
    valid: torch.Tensor,
    weights: Sequence[float] = DEEP_SUPERVISION_WEIGHTS,
) -> LossTerms:
    """The weighted sum of :func:`segmentation_loss` over the model's outputs.

    Args:
        outputs: logits ``[B, N, H, W, D]``, or the list ``SATVision`` returns with deep supervision on:
            full resolution first, then ``[B, N, H/s, W/s, D/s]`` for s = 2, 4, 8.
        targets: ``[B, N, H, W, D]`` binary masks at full resolution; max-pooled for the coarse outputs
            (:func:`downsample_targets`).
        valid: ``[B, N]`` bool.
        weights: one per output, normalised to sum to 1 over the outputs given (default 1, 1/2, 1/4, 1/8).
    """
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    if len(outputs) > len(weights):
        raise ValueError(f"{len(outputs)} outputs but only {len(weights)} deep-supervision weights")
    norm = sum(weights[: len(outputs)])
    scaled = [
        (weight / norm, segmentation_loss(logits, downsample_targets(targets, logits.shape[2:]), valid))
        for weight, logits in zip(weights, outputs, strict=False)
    ]
    return LossTerms(
        total=sum(weight * term.total for weight, term in scaled),
        dice=sum(weight * term.dice for weight, term in scaled),
        bce=sum(weight * term.bce for weight, term in scaled),
    )
