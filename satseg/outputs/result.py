"""The one result every path returns: the engine in process, the served ensemble's outputs on the client."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from satseg import contract
from satseg.outputs.statistics import StructureStatistics

WARNINGS_KEY = "warnings"
"""The key of the warnings in ``statistics.json``, ``case.json`` and ``run_report.json`` (no term is named so)."""


@dataclass(frozen=True)
class SegmentationResult:
    """One segmentation of one volume, on the volume's own grid.

    Attributes:
        terms: the resolved prompt of each structure, in prompt order (label value ``i + 1`` is ``terms[i]``).
        statistics: per term, :func:`~satseg.outputs.statistics.mask_statistics` of its own mask. A structure's
            volume is its mask's voxel count times the input grid's voxel volume, and each mask is cut on its own
            (``probability > threshold``), so a voxel in "kidney" and in "left kidney" counts in both; the label
            map, where each voxel goes to one structure, is a view for display and never measured.
        model_grid: ``(I, J, K)`` of the model grid the windows slid on (the spec's spacing and crop applied).
        masks: ``[N, I, J, K]`` uint8 in ``{0, 1}``, or ``None`` when not kept.
        labelmap: ``[I, J, K]`` uint16 in ``0..N`` (an overlap goes to the most probable term), or ``None``.
        warnings: one line each that the result must be read with (prompts outside the trained terms).
    """

    terms: tuple[str, ...]
    statistics: tuple[StructureStatistics, ...]
    model_grid: tuple[int, int, int]
    masks: np.ndarray | None = None
    labelmap: np.ndarray | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.statistics) != len(self.terms):
            raise ValueError(f"{len(self.statistics)} statistics for {len(self.terms)} terms")
        if self.masks is not None and len(self.masks) != len(self.terms):
            raise ValueError(f"{len(self.masks)} masks for {len(self.terms)} terms")

    @property
    def volumes_ml(self) -> np.ndarray:
        """``[N]`` float32: each structure's ``volume_ml``."""
        return np.array([entry["volume_ml"] for entry in self.statistics], np.float32)

    def statistics_document(self) -> dict[str, Any]:
        """What ``statistics.json`` holds: each term's statistics, and the warnings (only when there are any)."""
        notes = {WARNINGS_KEY: list(self.warnings)} if self.warnings else {}
        return {**dict(zip(self.terms, self.statistics, strict=True)), **notes}

    def to_outputs(self) -> dict[str, np.ndarray]:
        """The ``segmenter``'s (and so the ensemble's) output tensors; a volume not kept is an empty array."""
        return {
            contract.MASKS: self.masks if self.masks is not None else np.zeros((0, 0, 0, 0), np.uint8),
            contract.LABELMAP: self.labelmap if self.labelmap is not None else np.zeros((0, 0, 0), np.uint16),
            contract.LABELS: contract.strings(self.terms),
            contract.VOLUMES_ML: self.volumes_ml,
            contract.STATISTICS: contract.strings(json.dumps(entry, allow_nan=False) for entry in self.statistics),
            contract.MODEL_GRID: np.array(self.model_grid, np.int32),
            contract.WARNINGS: contract.strings(self.warnings),
        }

    @classmethod
    def from_outputs(cls, arrays: Mapping[str, np.ndarray]) -> SegmentationResult:
        """The inverse of :meth:`to_outputs`, from the arrays a client received."""
        masks, labelmap = arrays[contract.MASKS], arrays[contract.LABELMAP]
        statistics = contract.decode_strings(arrays[contract.STATISTICS], contract.STATISTICS)
        return cls(
            terms=tuple(contract.decode_strings(arrays[contract.LABELS], contract.LABELS)),
            statistics=tuple(json.loads(entry) for entry in statistics),
            model_grid=tuple(int(size) for size in arrays[contract.MODEL_GRID].reshape(-1)),  # type: ignore[arg-type]
            masks=masks if masks.size else None,
            labelmap=labelmap if labelmap.size else None,
            warnings=tuple(contract.decode_strings(arrays[contract.WARNINGS], contract.WARNINGS)),
        )
