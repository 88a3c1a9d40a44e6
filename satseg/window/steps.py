"""Where the sliding windows go: nnU-Net's evenly spaced grid, over a crop trimmed so no window is wasted."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from satseg.errors import SatInputError

WindowSlices = tuple[slice, slice, slice]
"""Index of one window in a ``[H, W, D]`` volume."""


def window_starts(size: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start indices of the windows along one axis, as nnU-Net computes them.

    With ``step = 1 - overlap`` (nnU-Net's ``tile_step_size``) there are
    ``n = ceil((size - patch) / (patch * step)) + 1`` windows whose starts are spaced
    evenly from ``0`` to ``size - patch`` and rounded half to even (``np.round``),
    so the first window touches the start, the last the end, and neighbours overlap
    by at least ``overlap * patch`` voxels.

    MONAI's ``dense_patch_slices`` is not used: it steps by a fixed interval and
    shifts only the last window to the end, which gives other windows than SAT's.

    Args:
        size: voxels along the axis, ``>= patch``.
        patch: window length in voxels, ``>= 1``.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``.

    Returns:
        ``n`` increasing ints in ``[0, size - patch]``, ``[0]`` when ``size == patch``.
    """
    if patch < 1 or size < patch:
        raise ValueError(f"need 1 <= patch <= size, got patch {patch} and size {size}")
    if not 0.0 <= overlap < 1.0:
        raise SatInputError(f"overlap must be in [0, 1), got {overlap}")
    step = 1.0 - overlap
    count = math.ceil((size - patch) / (patch * step)) + 1
    if count == 1:
        return [0]
    spacing = (size - patch) / (count - 1)
    return [round(spacing * i) for i in range(count)]


def window_slices(
    shape: tuple[int, int, int],
    patch_size: tuple[int, int, int],
    overlap: float = 0.5,
    spans: Sequence[tuple[int, int]] | None = None,
) -> list[WindowSlices]:
    """All windows covering a volume (or ``spans`` of it), the last axis varying fastest.

    Args:
        shape: ``(H, W, D)`` of the volume, each ``>=`` the matching patch size.
        patch_size: ``(h, w, d)`` window size in voxels.
        overlap: see :func:`window_starts`.
        spans: per axis the ``(start, stop)`` the windows cover (:func:`covered_spans`); default all of it.

    Returns:
        One ``(slice, slice, slice)`` per window; their union covers every voxel of the spans.
    """
    spans = [(0, size) for size in shape] if spans is None else spans
    starts = [
        [begin + start for start in window_starts(stop - begin, p, overlap)]
        for (begin, stop), p in zip(spans, patch_size, strict=True)
    ]
    return [
        tuple(slice(start, start + p) for start, p in zip(corner, patch_size, strict=True))  # type: ignore[misc]
        for corner in itertools.product(*starts)
    ]


def window_count(size: int, patch: int, overlap: float = 0.5) -> int:
    """Windows along an axis of ``size`` voxels (``>= 1``); a shorter axis is padded to one window."""
    return len(window_starts(max(size, patch), patch, overlap))


def economical_span(core: tuple[int, int], box: tuple[int, int], patch: int, overlap: float = 0.5) -> tuple[int, int]:
    """The widest span of ``box`` around ``core`` that needs no more windows than ``core`` alone.

    ``core`` is the foreground along one axis and ``box`` the foreground plus its crop margin. A margin that
    costs a whole extra window (a 294-voxel box over a 288-voxel foreground, with 288-voxel windows) is trimmed,
    evenly on both sides where it can be; the foreground itself is never trimmed. Voxels trimmed away are
    outside the foreground (air), where every prompt is background.

    Args:
        core: ``(start, stop)`` of the foreground, stop exclusive.
        box: ``(start, stop)`` containing ``core``.
        patch: window length in voxels.
        overlap: see :func:`window_starts`.

    Returns:
        ``(start, stop)`` with ``box[0] <= start <= core[0]`` and ``core[1] <= stop <= box[1]``.
    """
    (core_start, core_stop), (box_start, box_stop) = core, box
    if not box_start <= core_start <= core_stop <= box_stop:
        raise ValueError(f"the span {core} must lie inside {box}")
    needed = window_count(core_stop - core_start, patch, overlap)
    length = box_stop - box_start
    while window_count(length, patch, overlap) > needed:
        length -= 1
    extra = length - (core_stop - core_start)
    after = min(box_stop - core_stop, extra - extra // 2)
    before = min(core_start - box_start, extra - after)
    return core_start - before, core_stop + (extra - before)


def covered_spans(
    shape: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5, edge_allowance: float = 0.0
) -> list[tuple[int, int]]:
    """Per axis, the ``(start, stop)`` the windows cover: the whole axis, unless leaving at most
    ``edge_allowance * patch`` voxels at each end uncovered saves a window (then as little as that needs,
    evenly on both ends: :func:`economical_span`). ``shape`` is ``>=`` ``patch_size`` on every axis."""
    spans = []
    for size, patch in zip(shape, patch_size, strict=True):
        allowed = min(math.floor(edge_allowance * patch), (size - patch) // 2)
        spans.append(economical_span((allowed, size - allowed), (0, size), patch, overlap))
    return spans


def planned_windows(
    shape: Sequence[int], patch_size: tuple[int, int, int], overlap: float = 0.5, edge_allowance: float = 0.0
) -> tuple[list[tuple[int, int]], list[WindowSlices]]:
    """The covered spans and the windows the stitcher runs over a model grid of ``shape`` (a short axis is
    padded to one patch first, as the stitcher pads it)."""
    padded = tuple(max(size, patch) for size, patch in zip(shape, patch_size, strict=True))
    spans = covered_spans(padded, patch_size, overlap, edge_allowance)
    return spans, window_slices(padded, patch_size, overlap, spans)  # type: ignore[arg-type]
