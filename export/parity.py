"""Parity of exported graphs with PyTorch: logit error and per-prompt agreement of the thresholded masks.

Logit error alone misleads in both directions (a large error deep in the background is harmless, a small
one at the 0 crossing flips voxels), so the gate is the Dice agreement of the masks a user would get, per
prompt, with the max and 99th-percentile absolute logit error reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from satseg.geometry import Volume, prepare
from satseg.window import pad_to_patch, window_slices

DEFAULT_MIN_DICE = 0.99
"""FP32 ONNX must agree with PyTorch at least this well on every prompt's thresholded mask."""


@dataclass(frozen=True)
class ParityReport:
    """One graph on one set of inputs, against PyTorch.

    Attributes:
        graph: e.g. ``"vision fp32"``.
        inputs: what was fed (``"random"``, ``"example_ct windows"``).
        max_abs_error / p99_abs_error: absolute logit (or query) error.
        dice: prompt -> Dice agreement of ``logits > 0`` over all patches (empty in both: 1.0); empty for
            the text encoder, whose output is not a mask.
        min_dice: the gate; ``passed`` is whether every prompt's Dice reaches it.
    """

    graph: str
    inputs: str
    max_abs_error: float
    p99_abs_error: float
    dice: dict[str, float]
    min_dice: float
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        worst = f", worst prompt Dice {min(self.dice.values()):.4f}" if self.dice else ""
        verdict = "pass" if self.passed else f"FAIL (gate Dice >= {self.min_dice})"
        return (
            f"{self.graph} on {self.inputs}: max |error| {self.max_abs_error:.2e}, "
            f"p99 {self.p99_abs_error:.2e}{worst}: {verdict}"
        )


def absolute_errors(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Max and 99th-percentile ``|candidate - reference|`` (float64), for arrays of one shape."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    error = np.abs(candidate.astype(np.float64) - reference.astype(np.float64)).ravel()
    return float(error.max()), float(np.percentile(error, 99))


def mask_agreement(reference: np.ndarray, candidate: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Per prompt, Dice of ``reference > 0`` against ``candidate > 0``; both ``[B, N, H, W, D]`` logits.

    ``prompts`` names the ``N`` axis. A prompt empty in both counts as full agreement (1.0).
    """
    if reference.shape != candidate.shape or reference.shape[1] != len(prompts):
        raise ValueError(f"need [B, {len(prompts)}, ...] logits of one shape, got {reference.shape}, {candidate.shape}")
    agreement = {}
    for index, prompt in enumerate(prompts):
        a, b = reference[:, index] > 0, candidate[:, index] > 0
        total = int(a.sum()) + int(b.sum())
        agreement[prompt] = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    return agreement


def compare_vision(
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    candidate: Callable[[np.ndarray, np.ndarray], np.ndarray],
    patches: torch.Tensor,
    queries: torch.Tensor,
    prompts: Sequence[str],
    *,
    graph: str,
    inputs: str,
    min_dice: float = DEFAULT_MIN_DICE,
) -> ParityReport:
    """Run both on ``patches [B, 1, H, W, D]`` with ``queries [N, d]`` (the same for every patch), then compare."""
    batched = queries[None].expand(patches.shape[0], -1, -1).contiguous()
    with torch.inference_mode():
        expected = reference(patches, batched).float().cpu().numpy()
    got = candidate(patches.numpy(), batched.numpy()).astype(np.float32)
    worst, p99 = absolute_errors(expected, got)
    dice = mask_agreement(expected, got, prompts)
    passed = all(value >= min_dice for value in dice.values())
    return ParityReport(graph, inputs, worst, p99, dice, min_dice, passed)


def compare_text(
    reference: np.ndarray, candidate: np.ndarray, *, graph: str, inputs: str, max_abs_error: float
) -> ParityReport:
    """Queries ``[N, d]`` from PyTorch and from the graph; passes when the max error is at most ``max_abs_error``.

    ``min_dice`` of the report holds nothing for text (0.0): the gate is the error bound.
    """
    worst, p99 = absolute_errors(reference, candidate)
    return ParityReport(graph, inputs, worst, p99, {}, 0.0, worst <= max_abs_error)


def volume_patches(volume: Volume, modality: str, patch_size: tuple[int, int, int], count: int) -> torch.Tensor:
    """Up to ``count`` windows ``[B, 1, H, W, D]`` of a real volume as inference prepares it, the most textured first.

    Windows are ranked by intensity spread, so the comparison sees anatomy rather than air.
    """
    image, _ = pad_to_patch(prepare(volume, modality).image, patch_size)
    windows = [image[window] for window in window_slices(tuple(image.shape), patch_size)]
    windows.sort(key=lambda window: -float(window.std()))
    return torch.stack(windows[:count])[:, None].contiguous()
