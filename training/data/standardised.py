"""The standardised on-disk form of labelled datasets, and its reader.

``sat-standardise`` (:mod:`satseg_training.data.standardise`) writes under one root::

    images/<dataset>/<case>.nii.gz   float32 image on the model grid (RAS, 1x1x3 mm, cropped, z-scored)
    labels/<dataset>/<case>.nii.gz   uint16 label map on the same grid, source label values kept
    manifest.jsonl                   one JSON object per case (:class:`ManifestEntry`)
    unmapped.json                    {"<dataset>": ["<raw name>", ...]}: names not in the vocabulary

A manifest line, keys in this order (``case`` is ``<dataset>/<case id>``, paths are relative to the root)::

    {"case": "totalseg/example_ct", "dataset": "totalseg", "modality": "ct",
     "image": "images/totalseg/example_ct.nii.gz", "labels": "labels/totalseg/example_ct.nii.gz",
     "classes": {"1": "spleen", "5": "liver"}, "unmapped": {"23": "kidney_cyst_left"}, "extra_labels": [],
     "synthetic": null, "shape": [H, W, D], "affine": [[...], [...], [...], [0.0, 0.0, 0.0, 1.0]]}

Label values keep their source meaning (no renumbering), so every value in a map is exactly one of:
0 (background), a key of ``classes`` (its canonical vocabulary term; several values may share a term,
whose mask is then their union), a key of ``unmapped`` (named by the source, but not a vocabulary term),
or in ``extra_labels`` (unnamed by the source: SynthSeg's extra-cerebral tissues, to paint, never to
prompt). All three list only values present in the map. ``image`` is null and ``synthetic`` is
``"synthseg"`` for label-only maps, whose images are synthesised on the fly (:mod:`satseg_training.data.synthseg`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from satseg.errors import SatInputError
from satseg.geometry import load_nifti
from satseg_training.data.jsonl import numbered_lines

MANIFEST = "manifest.jsonl"
UNMAPPED = "unmapped.json"
IMAGES = "images"
LABELS = "labels"


@dataclass(frozen=True, eq=False)
class ManifestEntry:
    """One line of ``manifest.jsonl`` (see the module docstring for the format).

    Attributes:
        case: ``<dataset>/<case id>``, unique under the root.
        dataset: the source dataset's name.
        modality: one of ``satseg.geometry.MODALITIES`` (label-only maps: "mri", the modality synthesised).
        image: image path relative to the root, or ``None`` for label-only maps.
        labels: label map path relative to the root.
        classes: label value -> canonical vocabulary term, values present in the map only.
        unmapped: label value -> raw source name not in the vocabulary, values present in the map only.
        extra_labels: present values the source does not name, ascending.
        synthetic: ``None``, or ``"synthseg"`` when the image must be synthesised from the labels.
        shape: ``(H, W, D)`` of the image and the label map.
        affine: ``[4, 4]`` float64 model voxel -> RAS+ mm of both files.
    """

    case: str
    dataset: str
    modality: str
    image: str | None
    labels: str
    classes: dict[int, str]
    unmapped: dict[int, str]
    extra_labels: tuple[int, ...]
    synthetic: str | None
    shape: tuple[int, int, int]
    affine: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """The manifest line as a JSON-ready dict (keys as in the module docstring)."""
        return {
            "case": self.case,
            "dataset": self.dataset,
            "modality": self.modality,
            "image": self.image,
            "labels": self.labels,
            "classes": {str(value): term for value, term in self.classes.items()},
            "unmapped": {str(value): name for value, name in self.unmapped.items()},
            "extra_labels": list(self.extra_labels),
            "synthetic": self.synthetic,
            "shape": list(self.shape),
            "affine": np.asarray(self.affine, dtype=np.float64).tolist(),
        }

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> ManifestEntry:
        """Parse one manifest line (a decoded JSON object).

        Raises:
            KeyError, TypeError, ValueError: a key is missing or holds the wrong kind of value.
        """
        affine = np.asarray(line["affine"], dtype=np.float64)
        shape = tuple(int(size) for size in line["shape"])
        if affine.shape != (4, 4) or len(shape) != 3:
            raise ValueError(f"shape {line['shape']} / affine of size {affine.size} is not a 3D grid")
        return cls(
            case=str(line["case"]),
            dataset=str(line["dataset"]),
            modality=str(line["modality"]),
            image=None if line["image"] is None else str(line["image"]),
            labels=str(line["labels"]),
            classes={int(value): str(term) for value, term in line["classes"].items()},
            unmapped={int(value): str(name) for value, name in line["unmapped"].items()},
            extra_labels=tuple(int(value) for value in line["extra_labels"]),
            synthetic=None if line["synthetic"] is None else str(line["synthetic"]),
            shape=(shape[0], shape[1], shape[2]),
            affine=affine,
        )


def parse_manifest_line(text: str) -> ManifestEntry:
    """One line of ``manifest.jsonl`` as an entry.

    Raises:
        ValueError (``json.JSONDecodeError`` included), KeyError, TypeError: not a manifest line.
    """
    document = json.loads(text)
    if not isinstance(document, dict):
        raise TypeError("a manifest line must be a JSON object")
    return ManifestEntry.from_json(document)


class StandardisedDataset:
    """The cases of a standardised root, read on demand (only the manifest is held in memory)."""

    def __init__(self, root: str | Path) -> None:
        """Parse ``root/manifest.jsonl``.

        Raises:
            SatInputError: no manifest, or a line that is not a manifest entry (its number is given).
        """
        self.root = Path(root)
        path = self.root / MANIFEST
        entries = []
        for number, line in numbered_lines(path):
            try:
                entries.append(parse_manifest_line(line))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise SatInputError(f"{path} line {number} is not a manifest entry: {error!r}") from error
        self._cases = tuple(entries)

    def __len__(self) -> int:
        return len(self._cases)

    @property
    def cases(self) -> tuple[ManifestEntry, ...]:
        """All entries, in manifest order."""
        return self._cases

    def load(self, index: int) -> tuple[np.ndarray | None, np.ndarray, ManifestEntry]:
        """Read case ``index``.

        Returns:
            ``(image, labels, entry)``: ``image`` ``[H, W, D]`` float32 z-scored intensities, or ``None``
            for label-only maps; ``labels`` ``[H, W, D]`` uint16; ``entry`` the case's manifest entry.

        Raises:
            SatInputError: a file is missing or unreadable, or its shape is not the manifest's.
        """
        entry = self._cases[index]
        image = None if entry.image is None else self._read(entry.image, entry, np.float32)
        return image, self._read(entry.labels, entry, np.uint16), entry

    def _read(self, relative: str, entry: ManifestEntry, dtype: type[np.generic]) -> np.ndarray:
        path = self.root / relative
        if not path.is_file():
            raise SatInputError(f"{path} of case {entry.case} is missing; rerun sat-standardise to rebuild it")
        array = load_nifti(path).array
        if array.shape != entry.shape:
            raise SatInputError(f"{path} has shape {array.shape}; the manifest says {entry.shape}")
        return array.astype(dtype, copy=False)
