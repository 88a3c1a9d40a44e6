"""Where the sliding windows start: nnU-Net's evenly spaced grid."""

from __future__ import annotations

import itertools
import math

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
    shape: tuple[int, int, int], patch_size: tuple[int, int, int], overlap: float = 0.5
) -> list[WindowSlices]:
    """All windows covering a volume, the last axis varying fastest.

    Args:
        shape: ``(H, W, D)`` of the volume, each ``>=`` the matching patch size.
        patch_size: ``(h, w, d)`` window size in voxels.
        overlap: see :func:`window_starts`.

    Returns:
        One ``(slice, slice, slice)`` per window; their union covers every voxel.
    """
    starts = [window_starts(s, p, overlap) for s, p in zip(shape, patch_size, strict=True)]
    return [
        tuple(slice(start, start + p) for start, p in zip(corner, patch_size, strict=True))  # type: ignore[misc]
        for corner in itertools.product(*starts)
    ]
