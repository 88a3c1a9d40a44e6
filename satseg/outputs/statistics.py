"""Per-structure statistics and the JSON files that carry them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from satseg.atomic import atomic_file

VOLUME_DECIMALS = 3
"""mL rounded to 1 mm^3 (0.001 mL): finer than any segmentation boundary is accurate."""


def mask_statistics(mask: np.ndarray, voxel_volume_ml: float) -> dict[str, int | float]:
    """Size of one structure, as TotalSegmentator's ``--statistics`` reports it (in mL).

    Args:
        mask: ``[I, J, K]`` bool or integer, non-zero inside the structure.
        voxel_volume_ml: volume of one voxel in mL (``|det(affine[:3, :3])| / 1000``), > 0.

    Returns:
        ``{"voxels": int, "volume_ml": float}`` with the volume rounded to 0.001 mL.
    """
    if not (math.isfinite(voxel_volume_ml) and voxel_volume_ml > 0):
        raise ValueError(f"voxel volume must be a positive number of mL, got {voxel_volume_ml}")
    voxels = int(np.count_nonzero(mask))
    return {"voxels": voxels, "volume_ml": round(voxels * voxel_volume_ml, VOLUME_DECIMALS)}


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
