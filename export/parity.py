"""Parity of exported graphs with PyTorch: logit error and per-prompt agreement of the thresholded masks.

Logit error alone misleads in both directions (a large error deep in the background is harmless, a small
one at the 0 crossing flips voxels), so the gate is the Dice agreement of the masks a user would get, per
prompt, with the max and 99th-percentile absolute logit error reported beside it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from satseg.engine.preprocess import prepare
from satseg.geometry import Volume
from satseg.runtimes import GraphSession
from satseg.spec import ModelSpec
from satseg.window import pad_to_patch, window_slices
from satseg_export.isolated import run_isolated

DEFAULT_MIN_DICE = 0.99
"""FP32 ONNX must agree with PyTorch at least this well on every prompt's thresholded mask, in every runtime."""
BF16_MIN_DICE = 0.98
"""OpenVINO BF16 is offered only where it agrees with PyTorch at least this well on the real windows."""
INT8_MIN_DICE = 0.98
"""The INT8 graph is installed only where it agrees with PyTorch FP32 at least this well on real windows that
were not its calibration windows."""
MIN_GATED_VOXELS = 100
"""A prompt whose masks hold fewer voxels than this in both runs is reported, not gated: one flipped voxel of
a 10-voxel speck is Dice 0.95, which says nothing about the graph's arithmetic."""


@dataclass(frozen=True)
class ParityReport:
    """One graph on one set of inputs, against PyTorch.

    Attributes:
        graph: e.g. ``"vision fp32"``.
        inputs: what was fed (``"random"``, ``"example_ct windows"``).
        max_abs_error / p99_abs_error: absolute logit (or query) error.
        dice: prompt -> Dice agreement of ``logits > 0`` over all patches (empty in both: 1.0); empty for
            the text encoder, whose output is not a mask.
        min_dice: the gate; ``passed`` is whether every gated prompt's Dice reaches it.
        ungated: prompts whose masks hold fewer than :data:`MIN_GATED_VOXELS` voxels in both runs.
        blocking: whether a failure stops the export (``False`` for an optional precision such as BF16, which
            is then not offered).
    """

    graph: str
    inputs: str
    max_abs_error: float
    p99_abs_error: float
    dice: dict[str, float]
    min_dice: float
    passed: bool
    ungated: tuple[str, ...] = ()
    blocking: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ungated_note(self) -> str:
        """`` (not gated, under 100 voxels: a, b)``, or empty when every prompt was gated."""
        return f" (not gated, under {MIN_GATED_VOXELS} voxels: {', '.join(self.ungated)})" if self.ungated else ""

    def summary(self) -> str:
        worst = f", worst prompt Dice {min(self.dice.values()):.4f}" if self.dice else ""
        verdict = "pass" if self.passed else f"FAIL (gate Dice >= {self.min_dice})"
        return (
            f"{self.graph} on {self.inputs}: max |error| {self.max_abs_error:.2e}, "
            f"p99 {self.p99_abs_error:.2e}{worst}: {verdict}{self.ungated_note}"
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


def torch_logits(
    vision: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], patches: torch.Tensor, queries: torch.Tensor
) -> np.ndarray:
    """PyTorch's logits ``[B, N, H, W, D]`` (float32) for ``patches [B, 1, H, W, D]`` and ``queries [N, d]``.

    One patch per call, so the peak is one window's activations whatever ``B`` is.
    """
    with torch.inference_mode():
        return np.concatenate([vision(patch[None], queries[None]).float().cpu().numpy() for patch in patches])


def onnx_session(path: Path, *, low_memory: bool = False) -> Any | None:
    """An onnxruntime CPU session on ``path``, or ``None`` when this build has no kernel for one of its ops.

    ``low_memory`` turns off the arena and the memory pattern, so a run holds only its live tensors (slower
    to allocate; what makes a nano window fit in 23 GB).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if low_memory:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own NotImplemented/Fail types, not importable portably
        if lacks_kernels(error):
            return None
        raise


def lacks_kernels(error: Exception) -> bool:
    """Whether opening a graph failed because this onnxruntime build has no kernel for one of its ops."""
    return "NOT_IMPLEMENTED" in str(error) or "Could not find an implementation" in str(error)


def graph_vision_logits(
    graph: Path, patches: np.ndarray, queries: np.ndarray, runtime: str = "onnxruntime", precision: str = "fp32"
) -> np.ndarray | None:
    """``runtime``'s logits for ``patches [B, 1, H, W, D]`` and ``queries [N, d]``, computed in a child process.

    ``None`` when this onnxruntime cannot run the graph (FP16 on CPU). The child runs one patch at a time (a
    low-memory session for onnxruntime) and exits, so the caller's PyTorch model and the runtime never hold
    memory together.
    """
    with tempfile.TemporaryDirectory(prefix="sat-parity-") as folder:
        inputs, output = Path(folder) / "inputs.npz", Path(folder) / "logits.npy"
        np.savez(inputs, patches=patches, queries=queries)
        if not run_isolated(_graph_vision_logits_child, str(graph), runtime, precision, str(inputs), str(output)):
            return None
        return np.load(output)


def _graph_vision_logits_child(
    graph: str, runtime: str, precision: str, inputs: str, output: str, results: Any
) -> None:
    """Child process of :func:`graph_vision_logits`: puts whether the graph ran; its logits go to ``output``."""
    try:
        session = GraphSession(Path(graph), runtime, precision, low_memory=True)
    except Exception as error:  # the runtimes raise their own types, not importable portably
        if not lacks_kernels(error):
            raise
        results.put(False)
        return
    with np.load(inputs) as arrays:
        patches, queries = arrays["patches"], arrays["queries"][None]
    logits = [session.run({"image": patch[None], "queries": queries}, ["logits"])[0] for patch in patches]
    np.save(output, np.concatenate(logits).astype(np.float32, copy=False))
    results.put(True)


def compare_vision(
    expected: np.ndarray,
    got: np.ndarray,
    prompts: Sequence[str],
    *,
    graph: str,
    inputs: str,
    min_dice: float = DEFAULT_MIN_DICE,
    blocking: bool = True,
) -> ParityReport:
    """Logits ``[B, N, H, W, D]`` from PyTorch (``expected``) and from the graph, compared and gated."""
    worst, p99 = absolute_errors(expected, got)
    dice = mask_agreement(expected, got, prompts)
    largest = {
        prompt: max(int((expected[:, index] > 0).sum()), int((got[:, index] > 0).sum()))
        for index, prompt in enumerate(prompts)
    }
    ungated = tuple(prompt for prompt in prompts if largest[prompt] < MIN_GATED_VOXELS)
    passed = all(value >= min_dice for prompt, value in dice.items() if prompt not in ungated)
    return ParityReport(graph, inputs, worst, p99, dice, min_dice, passed, ungated, blocking)


def compare_text(
    reference: np.ndarray, candidate: np.ndarray, *, graph: str, inputs: str, max_abs_error: float
) -> ParityReport:
    """Queries ``[N, d]`` from PyTorch and from the graph; passes when the max error is at most ``max_abs_error``.

    ``min_dice`` of the report holds nothing for text (0.0): the gate is the error bound.
    """
    worst, p99 = absolute_errors(reference, candidate)
    return ParityReport(graph, inputs, worst, p99, {}, 0.0, worst <= max_abs_error)


def volume_patches(volume: Volume, modality: str, spec: ModelSpec, count: int | None) -> torch.Tensor:
    """Up to ``count`` (``None``: all) windows ``[B, 1, H, W, D]`` of a real volume as inference prepares it
    (the model ``spec``'s grid and window), the most textured first.

    Windows are ranked by intensity spread, so the comparison sees anatomy rather than air.
    """
    patch_size = spec.window.patch_size
    image, _ = pad_to_patch(prepare(volume, modality, spec.preprocess).image, patch_size)
    windows = [image[window] for window in window_slices(tuple(image.shape), patch_size)]
    windows.sort(key=lambda window: -float(window.std()))
    return torch.stack(windows[:count])[:, None].contiguous()
