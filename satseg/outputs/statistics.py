"""Per-structure statistics and the JSON files that carry them."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from satseg.atomic import atomic_file
from satseg.geometry.volume import Volume

VOLUME_DECIMALS = 3
"""mL rounded to 1 mm^3 (0.001 mL): finer than any segmentation boundary is accurate."""

INTENSITY_DECIMALS = 2
"""Intensities (HU for CT) rounded to 0.01 of the image's unit."""

BOX_DECIMALS = 2
"""Bounding-box coordinates rounded to 0.01 mm."""

INTENSITY_PERCENTILES: dict[str, float] = {"intensity_p5": 5.0, "intensity_median": 50.0, "intensity_p95": 95.0}
"""Percentile fields and their percent (numpy's linear interpolation; the 50th is numpy's median)."""

StructureStatistics = dict[str, int | float | bool | list[float] | None]
"""One structure's entry in ``statistics.json`` (see :func:`mask_statistics`)."""

WORLD_POINT_FIELDS = ("bbox_min_ras_mm", "bbox_max_ras_mm")
"""The fields that are an ``[x, y, z]`` RAS+ point in mm (``None`` for an empty mask)."""

EMPTY_FIELDS: tuple[str, ...] = (
    "intensity_mean",
    "intensity_std",
    *INTENSITY_PERCENTILES,
    *WORLD_POINT_FIELDS,
    "touches_fov_edge",
)
"""The fields that are ``None`` (JSON null) for an empty mask: they have no value, not a NaN."""


def mask_statistics(volume: Volume, mask: np.ndarray) -> StructureStatistics:
    """One structure's size, intensities and extent, as TotalSegmentator's ``--statistics`` reports them, plus
    where it lies and whether it is cut by the field of view.

    The mask's voxel indices are found once (``np.nonzero``); no full-volume float copy is made, only the
    structure's own values are gathered.

    Args:
        volume: the image the mask lies on: ``array`` ``[I, J, K]`` in the image's units (HU for CT) and
            ``affine`` ``[4, 4]`` voxel index -> RAS+ mm.
        mask: ``[I, J, K]`` bool or integer, non-zero inside the structure, on ``volume``'s grid.

    Returns:
        ``voxels`` (int) and ``volume_ml`` (mL, to 0.001 mL); over the structure's voxels, in the image's units
        to 0.01: ``intensity_mean``, ``intensity_std`` (population, ``ddof=0``), ``intensity_median``,
        ``intensity_p5`` and ``intensity_p95``; ``bbox_min_ras_mm`` and ``bbox_max_ras_mm``, ``[x, y, z]`` RAS+
        mm to 0.01 mm: the world-axis-aligned box around the 8 corners of the mask's index box, taken at voxel
        *centres* (a one-voxel structure has a zero-size box); for an affine without obliquity (flips and axis
        swaps included) this is exactly the min/max of the mask voxels' centres, for an oblique one it encloses
        them; ``touches_fov_edge`` (bool): a mask voxel lies on the first or last index of some axis, so the
        structure may be cut by the field of view and its volume be less than the real one. For an empty mask
        ``voxels`` and ``volume_ml`` are 0 and every other field is ``None`` (JSON null).

    Raises:
        ValueError: ``mask`` is not on ``volume``'s grid, or the affine gives no positive voxel volume.
    """
    if mask.shape != volume.shape:
        raise ValueError(f"mask of shape {mask.shape} is not on the volume's grid {volume.shape}")
    voxel_volume_ml = volume.voxel_volume_ml
    if not (math.isfinite(voxel_volume_ml) and voxel_volume_ml > 0):
        raise ValueError(f"voxel volume must be a positive number of mL, got {voxel_volume_ml}")
    indices = np.nonzero(mask)
    voxels = int(indices[0].size)
    statistics: StructureStatistics = {
        "voxels": voxels,
        "volume_ml": round(voxels * voxel_volume_ml, VOLUME_DECIMALS),
    }
    if voxels == 0:
        return statistics | dict.fromkeys(EMPTY_FIELDS)
    low = np.array([axis.min() for axis in indices])
    high = np.array([axis.max() for axis in indices])
    box_min, box_max = index_box_world(volume.affine, low, high)
    return (
        statistics
        | intensity_statistics(volume.array[indices])
        | {
            "bbox_min_ras_mm": [rounded(value, BOX_DECIMALS) for value in box_min],
            "bbox_max_ras_mm": [rounded(value, BOX_DECIMALS) for value in box_max],
            "touches_fov_edge": touches_edge(low, high, volume.shape),
        }
    )


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """Mean, population std and percentiles of one structure's voxel values.

    Args:
        values: ``[N]``, N >= 1, the structure's voxel values in the image's units (any real dtype; computed in
            float64).

    Returns:
        ``intensity_mean``, ``intensity_std`` and the :data:`INTENSITY_PERCENTILES` fields, rounded to
        :data:`INTENSITY_DECIMALS`.
    """
    values = np.asarray(values, dtype=np.float64)
    percentiles = np.percentile(values, list(INTENSITY_PERCENTILES.values()))
    return {
        "intensity_mean": rounded(values.mean(), INTENSITY_DECIMALS),
        "intensity_std": rounded(values.std(), INTENSITY_DECIMALS),
        **{
            name: rounded(value, INTENSITY_DECIMALS)
            for name, value in zip(INTENSITY_PERCENTILES, percentiles, strict=True)
        },
    }


def index_box_world(affine: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-axis-aligned box around an index box.

    Args:
        affine: ``[4, 4]`` voxel index -> RAS+ mm.
        low, high: ``[3]`` the index box's first and last voxel (inclusive) along each array axis.

    Returns:
        ``([3], [3])`` float64 min and max RAS+ mm over the box's 8 corner voxel centres.
    """
    corners = np.array(list(itertools.product(*zip(low, high, strict=True))), dtype=np.float64)  # [8, 3]
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def touches_edge(low: np.ndarray, high: np.ndarray, shape: tuple[int, int, int]) -> bool:
    """Whether an index box ``[low, high]`` (inclusive, ``[3]`` each) reaches index 0 or ``shape - 1`` of an axis."""
    return bool(np.any(low == 0) or np.any(high == np.asarray(shape) - 1))


def rounded(value: float, decimals: int) -> float:
    """``value`` as a Python float rounded to ``decimals``, with ``-0.0`` written as ``0.0``."""
    return round(float(value), decimals) + 0.0


def write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as UTF-8 JSON (indented, trailing newline) atomically; used for
    ``statistics.json`` and ``labels.json``.

    Raises ``ValueError`` for NaN or infinity (not JSON) and ``TypeError`` for objects
    JSON cannot hold, before anything is written.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_file(Path(path)) as file:
        file.write(text.encode("utf-8"))
    return Path(path)
