"""Write one segmentation run: masks or a label map, labels, statistics and a preview."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from satseg.geometry.volume import Volume
from satseg.outputs.labelmap import LabelMapAccumulator
from satseg.outputs.nifti import write_nifti
from satseg.outputs.preview import CT_SOFT_TISSUE_WINDOW, save_preview
from satseg.outputs.statistics import StructureStatistics, mask_statistics, write_json

LABELMAP_FILE = "labelmap.nii.gz"
LABELS_FILE = "labels.json"
STATISTICS_FILE = "statistics.json"
PREVIEW_FILE = "preview.png"
WARNINGS_KEY = "warnings"
"""The key of the warnings in ``statistics.json``, ``case.json`` and ``run_report.json`` (no term is named so)."""


class PromptResult(Protocol):
    """One prompt's result as the segmenter yields it (``satseg.pipeline.PromptProbabilities``).

    ``threshold`` travels with the probabilities: the writer cuts the mask where the segmenter's clean-up did.
    """

    index: int
    term: str
    probabilities: torch.Tensor
    threshold: float


@dataclass(frozen=True)
class OutputOptions:
    """Which files to write. ``modality`` picks the preview's grey window (a soft-tissue window for CT).
    ``warnings``: one line each that the results must be read with (prompts outside the trained terms); they go
    into ``statistics.json`` under :data:`WARNINGS_KEY`, beside the structures, when there are any.

    There is no threshold here: each result brings the one it was segmented with (:class:`PromptResult`).
    """

    merged_labelmap: bool = False
    statistics: bool = False
    preview: bool = False
    modality: str | None = None
    warnings: tuple[str, ...] = ()


def mask_file_name(term: str) -> str:
    """``"left kidney"`` -> ``"left_kidney.nii.gz"``: safe on every file system."""
    return re.sub(r"[^a-z0-9]+", "_", term.lower()).strip("_") + ".nii.gz"


def write_segmentation(
    volume: Volume,
    terms: Sequence[str],
    results: Iterable[PromptResult],
    output_dir: Path,
    options: OutputOptions = OutputOptions(),
) -> list[Path]:
    """Consume ``results`` one prompt at a time and write the outputs on ``volume``'s grid.

    Label value ``index + 1`` names ``terms[index]``. Each prompt's probabilities are thresholded (at the
    result's own ``threshold``) and dropped before the next arrives; only the merged label map (and the best
    probability so far) persists across prompts. Files are written atomically. Returns the paths written.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    merged = LabelMapAccumulator(volume.shape) if options.merged_labelmap or options.preview else None
    statistics: dict[str, StructureStatistics] = {}
    written: list[Path] = []
    for result in results:
        mask = (result.probabilities > result.threshold).to(torch.uint8).cpu().numpy()
        if not options.merged_labelmap:
            written.append(write_mask(mask, result.term, volume, output_dir))
        statistics[result.term] = mask_statistics(volume, mask)
        if merged is not None:
            merged.add(result.index + 1, result.probabilities, result.threshold)
    labelmap = merged.labelmap if merged is not None else None
    return written + write_summary(volume, terms, statistics, labelmap, output_dir, options)


def write_thresholded(
    volume: Volume,
    terms: Sequence[str],
    masks: np.ndarray | None,
    labelmap: np.ndarray | None,
    output_dir: Path,
    options: OutputOptions = OutputOptions(),
) -> list[Path]:
    """Write results that are already thresholded (a server's answer) on ``volume``'s grid.

    Args:
        masks: ``[N, I, J, K]`` uint8, one per term, or ``None``; written as ``<term>.nii.gz`` each.
        labelmap: ``[I, J, K]`` uint16 with value ``index + 1`` for ``terms[index]``, or ``None``; written
            when ``options.merged_labelmap``. The preview needs it.
    """
    if masks is None and labelmap is None:
        raise ValueError("nothing to write: neither masks nor a label map")
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if masks is not None:
        if len(masks) != len(terms):
            raise ValueError(f"{len(masks)} masks for {len(terms)} terms")
        written = [write_mask(mask, term, volume, output_dir) for term, mask in zip(terms, masks, strict=True)]
    statistics = thresholded_statistics(volume, terms, masks, labelmap)
    return written + write_summary(volume, terms, statistics, labelmap, output_dir, options)


def thresholded_statistics(
    volume: Volume, terms: Sequence[str], masks: np.ndarray | None, labelmap: np.ndarray | None
) -> dict[str, StructureStatistics]:
    """:func:`~satseg.outputs.statistics.mask_statistics` per term, from its mask (``masks[index]``,
    ``[N, I, J, K]``), else from its label value ``index + 1`` in ``labelmap`` (``[I, J, K]``)."""
    return {
        term: mask_statistics(volume, masks[index] if masks is not None else labelmap == index + 1)
        for index, term in enumerate(terms)
    }


def write_mask(mask: np.ndarray, term: str, volume: Volume, output_dir: Path) -> Path:
    """One ``<term>.nii.gz`` uint8 mask on ``volume``'s grid."""
    return write_nifti(mask, volume.affine, output_dir / mask_file_name(term), labels={1: term})


def write_summary(
    volume: Volume,
    terms: Sequence[str],
    statistics: dict[str, StructureStatistics],
    labelmap: np.ndarray | None,
    output_dir: Path,
    options: OutputOptions,
) -> list[Path]:
    """The label map (when asked for), ``labels.json``, statistics and preview of one run."""
    labels = {index + 1: term for index, term in enumerate(terms)}
    written: list[Path] = []
    if labelmap is not None and options.merged_labelmap:
        written.append(write_nifti(labelmap, volume.affine, output_dir / LABELMAP_FILE, labels=labels))
    written.append(write_json({str(value): term for value, term in labels.items()}, output_dir / LABELS_FILE))
    if options.statistics:
        notes = {WARNINGS_KEY: list(options.warnings)} if options.warnings else {}
        written.append(write_json({**statistics, **notes}, output_dir / STATISTICS_FILE))
    if labelmap is not None and options.preview:
        window = CT_SOFT_TISSUE_WINDOW if options.modality == "ct" else None
        written.append(
            save_preview(volume.array, volume.affine, labelmap, labels, output_dir / PREVIEW_FILE, window=window)
        )
    return written
