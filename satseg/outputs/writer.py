"""Write one segmentation result: masks or a label map, labels, statistics and a preview, on the input grid."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from satseg.geometry.volume import Volume
from satseg.outputs.nifti import write_nifti
from satseg.outputs.preview import CT_SOFT_TISSUE_WINDOW, save_preview
from satseg.outputs.result import SegmentationResult
from satseg.outputs.statistics import write_json

LABELMAP_FILE = "labelmap.nii.gz"
LABELS_FILE = "labels.json"
STATISTICS_FILE = "statistics.json"
PREVIEW_FILE = "preview.png"
MAX_SLUG_CHARS = 64
"""Mask file names stay far below every file system's 255-byte limit, whatever the prompt's length."""


@dataclass(frozen=True)
class OutputOptions:
    """Which files :func:`write_result` writes.

    ``masks``: one ``<term>.nii.gz`` per term (from the result's masks); ``merged_labelmap``: ``labelmap.nii.gz``;
    ``statistics``: ``statistics.json`` (the result's statistics and warnings); ``preview``: ``preview.png``, whose
    grey window ``modality`` picks (a soft-tissue window for CT). ``labels.json`` is always written.
    """

    masks: bool = True
    merged_labelmap: bool = False
    statistics: bool = False
    preview: bool = False
    modality: str | None = None


def mask_file_name(term: str) -> str:
    """A bounded, unique and stable file name for a term's mask, safe on every file system.

    A term of lower-case words, digits and single spaces that fits in :data:`MAX_SLUG_CHARS` is spelt out
    (``"left kidney"`` -> ``"left_kidney.nii.gz"``), and only such a term maps to a name without a hash. Any
    other term (longer, with capitals or punctuation) gets a short slug plus the first 10 hex digits of its
    SHA-256 (``"Left Kidney!"`` -> ``"left_kidney_<hash>.nii.gz"``), so two prompts never share a file. The
    full term is kept in ``labels.json`` and in the mask's NIfTI header.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", term.lower()).strip("_")
    if slug.replace("_", " ") == term and len(slug) <= MAX_SLUG_CHARS:
        return slug + ".nii.gz"
    digest = hashlib.sha256(term.encode("utf-8")).hexdigest()[:10]
    short = slug[: MAX_SLUG_CHARS - len(digest) - 1].rstrip("_")
    return f"{short}_{digest}.nii.gz" if short else f"{digest}.nii.gz"


def write_result(
    volume: Volume, result: SegmentationResult, output_dir: Path, options: OutputOptions = OutputOptions()
) -> list[Path]:
    """Write ``result`` (on ``volume``'s grid) into ``output_dir`` atomically, file by file; returns the paths.

    Raises:
        ValueError: a file is asked for whose volume the result does not hold (masks, or the label map for the
            label map file or the preview).
    """
    if options.masks and result.masks is None:
        raise ValueError("mask files need the masks, which this result does not hold")
    if (options.merged_labelmap or options.preview) and result.labelmap is None:
        raise ValueError("the label map file and the preview need the label map, which this result does not hold")
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if options.masks and result.masks is not None:
        for term, mask in zip(result.terms, result.masks, strict=True):
            written.append(write_mask(mask, term, volume, output_dir))
    labels = {index + 1: term for index, term in enumerate(result.terms)}
    if options.merged_labelmap and result.labelmap is not None:
        written.append(write_nifti(result.labelmap, volume.affine, output_dir / LABELMAP_FILE, labels=labels))
    written.append(write_json({str(value): term for value, term in labels.items()}, output_dir / LABELS_FILE))
    if options.statistics:
        written.append(write_json(result.statistics_document(), output_dir / STATISTICS_FILE))
    if options.preview and result.labelmap is not None:
        window = CT_SOFT_TISSUE_WINDOW if options.modality == "ct" else None
        written.append(
            save_preview(volume.array, volume.affine, result.labelmap, labels, output_dir / PREVIEW_FILE, window=window)
        )
    return written


def mask_writer(volume: Volume, output_dir: Path, written: list[Path]) -> Callable[[int, str, np.ndarray], None]:
    """A mask sink for the engine: writes each ``<term>.nii.gz`` as it is cut and appends its path to ``written``,
    so no mask is held after its file exists."""
    output_dir.mkdir(parents=True, exist_ok=True)

    def write(index: int, term: str, mask: np.ndarray) -> None:
        written.append(write_mask(mask, term, volume, output_dir))

    return write


def write_mask(mask: np.ndarray, term: str, volume: Volume, output_dir: Path) -> Path:
    """One ``<term>.nii.gz`` uint8 mask on ``volume``'s grid."""
    return write_nifti(mask, volume.affine, output_dir / mask_file_name(term), labels={1: term})
