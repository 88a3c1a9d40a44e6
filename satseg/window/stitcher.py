"""Sliding-window inference: run a predictor over overlapping patches and blend the probabilities."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from satseg.errors import SatInputError
from satseg.spec import DEFAULT_SIGMA_SCALE, check_patch_size
from satseg.window.importance import gaussian_importance_map
from satseg.window.steps import planned_windows

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(patches [B, 1, h, w, d] float32, queries [B, N, C] float32) -> logits [B, N, h, w, d]``.

A plain callable so the same stitcher drives a torch module, an onnxruntime session or a
remote (Triton) call. Logits may be any float dtype; they are upcast before the sigmoid.
The stitcher owns the logits it is given: float32 ones become the probabilities in place.
"""
ADD_CHUNK_BYTES = 8 << 20
"""float32 accumulator rows added at a time: a few prompts' window, so the temporaries stay small and reused."""


def sliding_window_probabilities(
    image: torch.Tensor,
    queries: torch.Tensor,
    predictor: Predictor,
    patch_size: tuple[int, int, int],
    *,
    overlap: float = 0.5,
    sigma_scale: float = DEFAULT_SIGMA_SCALE,
    edge_allowance: float = 0.0,
    batch_size: int = 1,
    accumulator_dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-prompt probabilities for a whole volume from patch-wise logits.

    Windows are placed as nnU-Net places them (:func:`~satseg.window.steps.window_starts`).
    Each window's logits go through the sigmoid and are blended with a Gaussian importance
    map ``w`` (peak 10): the result is ``sum(w * sigmoid(logits)) / sum(w)`` per voxel.

    ``sum(w)`` does not depend on the prompts or the logits, so it is summed once before
    inference and every window adds ``sigmoid(logits) * w / sum(w)``: the accumulator holds
    the final probability, no addend or partial sum exceeds 1 (far below fp16's 65504), and
    no division pass is needed. In fp16 each addition rounds by at most 2**-12; against
    fp32 the result differs by ~2e-4 on average and up to ~3e-3 where nnU-Net's rounded
    grid stacks 27 windows on a voxel (summing ``w * p`` and dividing at the end measured worse).

    Memory: one ``[N, H', W', D']`` accumulator in ``accumulator_dtype`` and one
    ``[H', W', D']`` float32 weight sum shared by all prompts, where ``H', W', D'`` is the
    volume padded up to at least one patch. Both live on ``device``; if that raises
    ``torch.OutOfMemoryError`` they are made on the CPU with a warning and each batch's
    logits are copied there.

    Args:
        image: ``[H, W, D]`` float32, z-scored intensities (any device).
        queries: ``[N, C]`` float32 prompt embeddings, ``N >= 1``.
        predictor: see :data:`Predictor`; called with tensors on ``device``.
        patch_size: ``(h, w, d)`` window size in voxels.
        overlap: fraction shared by neighbouring windows, in ``[0, 1)``.
        edge_allowance: up to this fraction of the patch at each end of an axis may be left uncovered where that
            saves a window (:func:`~satseg.window.steps.covered_spans`); those voxels take the probabilities of
            the nearest covered voxel along the axis (edge replication). ``0`` covers every voxel.
        sigma_scale: the importance map's Gaussian sigma as a fraction of the patch size.
        batch_size: windows per predictor call.
        accumulator_dtype: float dtype of the accumulator and of the result.
        device: where patches, queries and accumulators go; default the image's device.
        progress: show a tqdm bar over windows.

    Returns:
        ``[N, H, W, D]`` probabilities in ``[0, 1]``, dtype ``accumulator_dtype``, on
        ``device`` (or the CPU after the fallback). A volume that had to be padded comes
        back as a view into the padded buffer.
    """
    _check_arguments(image, queries, patch_size, batch_size, accumulator_dtype)
    device = image.device if device is None else torch.device(device)
    with torch.inference_mode():
        padded, crop = pad_to_patch(image.to(device=device, dtype=torch.float32), patch_size)
        queries = queries.to(device=device, dtype=torch.float32)
        spans, windows = planned_windows(padded.shape, patch_size, overlap, edge_allowance)
        num_prompts = queries.shape[0]
        try:
            probabilities, weights = _allocate_accumulators(num_prompts, padded.shape, accumulator_dtype, device)
        except torch.OutOfMemoryError:
            warnings.warn(
                f"out of memory for the sliding-window sums on {device}; accumulating on the CPU instead",
                stacklevel=2,
            )
            probabilities, weights = _allocate_accumulators(
                num_prompts, padded.shape, accumulator_dtype, torch.device("cpu")
            )
        importance = gaussian_importance_map(patch_size, device=weights.device, sigma_scale=sigma_scale)
        for window in windows:
            weights[window] += importance

        with tqdm(total=len(windows), desc="windows", disable=not progress) as bar:
            for first in range(0, len(windows), batch_size):
                batch = windows[first : first + batch_size]
                _add_batch(probabilities, weights, importance, padded, batch, queries, predictor)
                bar.update(len(batch))

        replicate_edges(probabilities, spans)
        # Rounding of the partial sums can overshoot 1 by an ulp.
        return probabilities[(slice(None), *crop)].clamp_(0.0, 1.0)


def _add_batch(
    probabilities: torch.Tensor,
    weights: torch.Tensor,
    importance: torch.Tensor,
    padded: torch.Tensor,
    batch: Sequence[tuple[slice, ...]],
    queries: torch.Tensor,
    predictor: Predictor,
) -> None:
    """Run ``predictor`` on the ``batch`` of windows and add their blended probabilities to ``probabilities``.

    A function of its own so that a batch's logits are freed on return, not held through the next batch's
    forward pass (for ``nano`` with 32 prompts, 2 GB a window).
    """
    patches = torch.stack([padded[window] for window in batch]).unsqueeze(1)
    expected = (len(batch), queries.shape[0], *patches.shape[2:])
    logits = predictor(patches, queries.expand(len(batch), -1, -1))
    if logits.shape != expected:
        raise ValueError(f"predictor returned logits of shape {tuple(logits.shape)}, expected {expected}")
    # In place: a second window-sized tensor would cost its allocation and page faults (nano: 1 GB a window for
    # 32 prompts), more than the sigmoid itself.
    window_probabilities = logits.to(device=weights.device, dtype=torch.float32).contiguous().sigmoid_()
    del logits
    for window, blended in zip(batch, window_probabilities, strict=True):
        blended.mul_(importance / weights[window])
        _accumulate(probabilities, window, blended)


def _accumulate(probabilities: torch.Tensor, window: tuple[slice, ...], blended: torch.Tensor) -> None:
    """``probabilities[:, window] += blended`` (``[N, h, w, d]`` float32), a few prompts at a time.

    For a float16 accumulator, PyTorch's mixed-dtype ``+=`` on the window's strided view was 7x slower than the
    same sum in float32; upcasting each chunk, adding and writing it back rounds the same sum once, as ``+=``
    does, so the result is bit for bit the same (2.3x faster for the whole blend of nano's or 128 prompts'
    windows, benchmarks/RESULTS.md).
    """
    step = max(1, ADD_CHUNK_BYTES // (blended[0].numel() * 4))
    for start in range(0, blended.shape[0], step):
        view = probabilities[(slice(start, start + step), *window)]
        if view.dtype == torch.float32:
            view += blended[start : start + step]
            continue
        total = view.float()
        total += blended[start : start + step]
        view.copy_(total)


def replicate_edges(values: torch.Tensor, spans: Sequence[tuple[int, int]]) -> None:
    """Fill ``values [N, H, W, D]`` outside ``spans`` (one ``(start, stop)`` per spatial axis) in place with the
    nearest slice inside them, axis by axis."""
    for axis, (start, stop) in enumerate(spans, start=1):
        if start > 0:
            values.narrow(axis, 0, start).copy_(values.narrow(axis, start, 1).expand_as(values.narrow(axis, 0, start)))
        end = values.shape[axis] - stop
        if end > 0:
            last = values.narrow(axis, stop - 1, 1)
            values.narrow(axis, stop, end).copy_(last.expand_as(values.narrow(axis, stop, end)))


def _check_arguments(
    image: torch.Tensor,
    queries: torch.Tensor,
    patch_size: Sequence[int],
    batch_size: int,
    accumulator_dtype: torch.dtype,
) -> None:
    """Raise :class:`SatInputError` for arguments the stitcher cannot work with."""
    if image.ndim != 3:
        raise SatInputError(f"image must be 3D [H, W, D], got shape {tuple(image.shape)}")
    if queries.ndim != 2 or queries.shape[0] < 1:
        raise SatInputError(f"queries must be [N, C] with N >= 1, got shape {tuple(queries.shape)}")
    check_patch_size(patch_size)
    if batch_size < 1:
        raise SatInputError(f"batch size must be >= 1, got {batch_size}")
    if not accumulator_dtype.is_floating_point:
        raise SatInputError(f"accumulator dtype must be a float dtype, got {accumulator_dtype}")


def pad_to_patch(
    image: torch.Tensor, patch_size: tuple[int, int, int]
) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Pad ``[H, W, D]`` to at least ``patch_size``, centred as nnU-Net does.

    The fill is the image minimum: inputs are z-scored, so their minimum is the
    background (air in CT, no signal in MR/PET), which the model has seen around the body.

    Returns:
        The padded ``[H', W', D']`` volume (``image`` itself when no axis is short) and
        the slices that crop ``[H', W', D']`` back to ``[H, W, D]``.
    """
    shortfall = [max(p - s, 0) for s, p in zip(image.shape, patch_size, strict=True)]
    before = [short // 2 for short in shortfall]
    crop = tuple(slice(b, b + s) for b, s in zip(before, image.shape, strict=True))
    if not any(shortfall):
        return image, crop  # type: ignore[return-value]
    # F.pad takes (before, after) pairs starting from the last axis.
    pads = [n for b, short in zip(before[::-1], shortfall[::-1], strict=True) for n in (b, short - b)]
    return F.pad(image, pads, value=float(image.min())), crop  # type: ignore[return-value]


def _allocate_accumulators(
    num_prompts: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed sums: probabilities ``[N, H', W', D']`` in ``dtype`` and weights ``[H', W', D']`` float32."""
    probabilities = torch.zeros((num_prompts, *shape), dtype=dtype, device=device)
    weights = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    return probabilities, weights
