"""Readers for labelled datasets in their source formats, all giving cases in one form.

Each reader lists its cases without reading any volume, as :class:`CaseSource` (dataset, case, modality,
raw class names, and how to load it), so a resumed run skips finished cases for free and a broken file
fails only its own case. ``CaseSource.load()`` reads one case as a :class:`LabelledCase` whose label map
is checked to lie on the image's grid.

Formats:

- nnU-Net raw (:func:`nnunet_cases`): ``dataset.json`` + ``imagesTr/<case>_0000<ending>`` +
  ``labelsTr/<case><ending>``; only channel 0 is read.
- a label map and a names JSON ``{"1": "spleen", ...}`` (TotalSegmentator's ``classes_*.json``)
  (:func:`labelmap_case`).
- a folder of binary masks, one ``<structure>.nii.gz`` per structure, beside an image
  (:func:`mask_folder_case`).
- a JSONL manifest (:func:`manifest_cases`).
- label-only SynthSeg maps ``training_seg_*.nii.gz`` + ``labels.json`` (:func:`synthseg_cases`).

Label values keep their source meaning; value 0 is background and never a class. Values in a map that
the source does not name (SynthSeg's extra-cerebral tissues) stay in the map without a class.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from satseg.errors import SatInputError
from satseg.geometry import Volume, load_volume
from satseg.geometry.volume import check_modality
from satseg_training.data.jsonl import numbered_lines

GRID_TOLERANCE_MM = 1e-3
"""A label map lies on its image's grid when the shapes match and the affines differ by at most this."""
NIFTI_ENDINGS = (".nii.gz", ".nii")

_MODALITY_NAMES: dict[str, str] = {
    "ct": "ct",
    "mr": "mri",
    "mri": "mri",
    "t1": "mri",
    "t1w": "mri",
    "t1c": "mri",
    "t1ce": "mri",
    "t1gd": "mri",
    "t2": "mri",
    "t2w": "mri",
    "flair": "mri",
    "pd": "mri",
    "dwi": "mri",
    "adc": "mri",
    "pet": "pet",
    "pt": "pet",
    "us": "us",
    "ultrasound": "us",
}
_NNUNET_IMAGE_SUFFIX = "_0000"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LabelledCase:
    """One case read from a source, labels on the image's grid.

    Attributes:
        case_id: the case's name within its dataset (a file or folder stem).
        image: the image, or ``None`` for label-only sources (SynthSeg maps).
        labels: ``[I, J, K]`` uint16 label values, 0 = background, on the grid of ``image``.
        affine: ``[4, 4]`` float64 voxel -> RAS+ mm of ``labels`` (``image.affine`` within 1e-3 mm).
        classes: label value -> name as the source writes it ("kidney_left"), value 0 excluded; values
            the source names need not occur in ``labels``, and values in ``labels`` need not be named.
        modality: one of ``satseg.geometry.MODALITIES``.
        dataset: the dataset's name.
    """

    case_id: str
    image: Volume | None
    labels: np.ndarray
    affine: np.ndarray
    classes: dict[int, str]
    modality: str
    dataset: str


LoadArrays = Callable[[], tuple[Volume | None, Volume]]
"""Reads ``(image or None, labels)``; the labels Volume holds uint16 values (see :func:`read_labels`)."""


@dataclass(frozen=True)
class CaseSource:
    """A listed case, not yet read.

    Attributes:
        dataset, case_id, modality, classes: as in :class:`LabelledCase` (known without reading volumes).
        read: reads the image (or ``None``) and the label map.
    """

    dataset: str
    case_id: str
    modality: str
    classes: dict[int, str]
    read: LoadArrays

    @property
    def key(self) -> str:
        """``<dataset>/<case_id>``: unique among the cases of one standardised root."""
        return f"{self.dataset}/{self.case_id}"

    def load(self) -> LabelledCase:
        """Read the case.

        Raises:
            SatInputError: a file is missing, unreadable or not a usable volume, label values are not
                integers in 0..65535, or the labels do not lie on the image's grid.
        """
        image, labels = self.read()
        if image is not None:
            check_same_grid(image, labels, f"labels of case {self.key}")
        return LabelledCase(
            case_id=self.case_id,
            image=image,
            labels=labels.array,
            affine=labels.affine,
            classes=self.classes,
            modality=self.modality,
            dataset=self.dataset,
        )


def modality_from_name(name: str) -> str:
    """The modality a source's name for it means: "CT" -> ct, "T2"/"MRI"/"ADC" -> mri, "PET" -> pet.

    Raises:
        SatInputError: a name not known here (the caller can state the modality instead).
    """
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key in _MODALITY_NAMES:
        return _MODALITY_NAMES[key]
    return check_modality(name)


def check_same_grid(image: Volume, labels: Volume, what: str) -> None:
    """Raise SatInputError unless ``labels`` has ``image``'s shape and affine (within 1e-3 mm)."""
    if labels.shape != image.shape:
        raise SatInputError(
            f"{what} have shape {'x'.join(map(str, labels.shape))} but the image has "
            f"{'x'.join(map(str, image.shape))}; labels must lie on the image's grid"
        )
    difference = float(np.abs(np.asarray(labels.affine) - np.asarray(image.affine)).max())
    if difference > GRID_TOLERANCE_MM:
        raise SatInputError(
            f"{what} have an affine differing from the image's by up to {difference:.4g} "
            f"(tolerance {GRID_TOLERANCE_MM:g}); labels must lie on the image's grid"
        )


def read_labels(path: Path) -> Volume:
    """A label map file as a Volume of ``[I, J, K]`` uint16 values.

    Float files (SynthSeg's maps) are accepted when every value is a whole number.

    Raises:
        SatInputError: unreadable, not a usable 3D volume, or values not whole numbers in 0..65535.
    """
    volume = load_volume(path)
    array = volume.array
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise SatInputError(f"label map {path.name!r} holds non-integer values; label values must be whole numbers")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise SatInputError(f"label map {path.name!r} holds values {low:g}..{high:g}; label maps must hold 0..65535")
    return Volume(array.astype(np.uint16), volume.affine)


def read_names(path: Path) -> dict[int, str]:
    """Label names from a JSON object ``{"1": "spleen", ...}``; value 0 (background) is left out.

    Raises:
        SatInputError: unreadable, not JSON, or not an object of whole-number keys and string names.
    """
    document = _read_json(path)
    expected = 'a JSON object {"1": "spleen", ...} of label values and names'
    if not isinstance(document, dict):
        raise SatInputError(f"label names {path.name!r}: expected {expected}")
    return _names_from_object(document, f"label names {path.name!r}", expected)


def merge_masks(image: Volume, masks: Sequence[Path]) -> Volume:
    """One label map from binary masks on ``image``'s grid: mask ``n`` (from 1) paints value ``n``.

    A voxel is inside a mask when its value is above 0. Where masks overlap, the later mask wins; the
    number of overlapping voxels is logged as a warning, since the earlier structure loses them.

    Returns:
        A uint16 ``[I, J, K]`` Volume with ``image``'s affine.

    Raises:
        SatInputError: a mask is unreadable or not on the image's grid, or there are over 65535 masks.
    """
    if len(masks) > np.iinfo(np.uint16).max:
        raise SatInputError(f"{len(masks)} masks are more than a uint16 label map holds (65535)")
    labels = np.zeros(image.shape, dtype=np.uint16)
    for value, path in enumerate(masks, start=1):
        mask = load_volume(path)
        check_same_grid(image, mask, f"mask {path.name!r}")
        inside = mask.array > 0
        overlap = int(np.count_nonzero(labels[inside]))
        if overlap:
            logger.warning("mask %s overlaps earlier masks in %d voxels; the later mask wins there", path.name, overlap)
        labels[inside] = value
    return Volume(labels, image.affine)


def nnunet_cases(folder: Path, *, modality: str | None = None) -> list[CaseSource]:
    """The training cases of an nnU-Net raw dataset folder (v2 ``dataset.json``; v1 is read too).

    The dataset is named after the folder; cases are the files in ``labelsTr``, each with the image
    ``imagesTr/<case>_0000<file_ending>`` (other channels are ignored).

    Args:
        folder: the dataset folder (``Dataset003_Liver``).
        modality: overrides the modality given by ``channel_names["0"]`` (v1: ``modality["0"]``).

    Raises:
        SatInputError: no ``dataset.json``, or one without usable labels, channel name or file ending.
    """
    folder = Path(folder)
    document = _read_json(folder / "dataset.json")
    where = f"nnU-Net {folder / 'dataset.json'}"
    if not isinstance(document, dict):
        raise SatInputError(f"{where}: expected a JSON object")
    classes = _nnunet_classes(document.get("labels"), where)
    if modality is None:
        channels = document.get("channel_names", document.get("modality"))
        if not isinstance(channels, dict) or not isinstance(channels.get("0"), str):
            raise SatInputError(f'{where}: no "channel_names" {{"0": ...}}; state the modality instead')
        modality = modality_from_name(channels["0"])
    modality = check_modality(modality)
    ending = document.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise SatInputError(f"{where}: file_ending {ending!r} is not read here; accepted: {', '.join(NIFTI_ENDINGS)}")
    label_folder = folder / "labelsTr"
    if not label_folder.is_dir():
        raise SatInputError(f"{where}: no labelsTr folder beside it")
    cases = []
    for label_path in _nifti_files(label_folder, (ending,)):
        case_id = label_path.name[: -len(ending)]
        image_path = folder / "imagesTr" / f"{case_id}{_NNUNET_IMAGE_SUFFIX}{ending}"
        read = _image_and_labels(image_path, label_path)
        cases.append(CaseSource(folder.name, case_id, modality, classes, read))
    return cases


def labelmap_case(image: Path, labels: Path, names: Path, *, modality: str, dataset: str) -> CaseSource:
    """One image with its label map and a names JSON ``{"1": "spleen", ...}``.

    The case is named after the image file (``example_ct.nii.gz`` -> ``example_ct``).

    Raises:
        SatInputError: the names JSON is unusable or the modality unknown (files are read by ``load``).
    """
    read = _image_and_labels(image, labels)
    return CaseSource(dataset, nifti_stem(image), check_modality(modality), read_names(names), read)


def mask_folder_case(image: Path, folder: Path, *, modality: str, dataset: str) -> CaseSource:
    """An image and a folder of binary masks, one ``<structure>.nii[.gz]`` per structure.

    Masks are taken in file-name order and numbered from 1; each class is its file's stem. The image may
    lie in the folder (TotalSegmentator's crops do); it is not taken as a mask. The case is named after
    the folder. Overlaps: see :func:`merge_masks`.

    Raises:
        SatInputError: the folder holds no masks, or the modality is unknown.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SatInputError(f"mask folder {folder} does not exist")
    masks = [path for path in _nifti_files(folder) if path.resolve() != Path(image).resolve()]
    if not masks:
        raise SatInputError(f"mask folder {folder} holds no .nii / .nii.gz masks")
    return mask_files_case(image, masks, modality=modality, dataset=dataset, case_id=folder.name)


def manifest_cases(path: Path) -> list[CaseSource]:
    """The cases of a JSONL manifest, one JSON object per line.

    Each line: ``"image"`` (a path), ``"label"`` (a list of binary mask paths, classes from their stems,
    or one label map path, then ``"classes"`` is required: ``{"1": "liver"}`` or the path of such a
    JSON), ``"modality"`` ("ct", "MRI", "T2", ...), and optionally ``"dataset"`` (default: the manifest's
    stem) and ``"case"`` (default: the image's stem). Relative paths resolve against the manifest's
    folder. Blank lines are skipped.

    Raises:
        SatInputError: the manifest is unreadable, or a line is not such an object (its number is given).
    """
    path = Path(path)
    return [
        _manifest_line(line, f"manifest {path.name} line {number}", path.parent, path.stem)
        for number, line in numbered_lines(path)
    ]


def synthseg_cases(folder: Path) -> list[CaseSource]:
    """Label-only SynthSeg maps: ``training_seg_*.nii[.gz]`` named by ``labels.json``, modality mri.

    The dataset is named after the folder. The maps' unnamed values (502-530: extra-cerebral tissues,
    and FreeSurfer codes labels.json leaves out, such as 30 / 62 vessels) stay in the maps for synthesis
    but are no classes.

    Raises:
        SatInputError: no ``labels.json`` or no maps.
    """
    folder = Path(folder)
    classes = read_names(folder / "labels.json")
    maps = [path for path in _nifti_files(folder) if path.name.startswith("training_seg_")]
    if not maps:
        raise SatInputError(f"SynthSeg folder {folder} holds no training_seg_*.nii.gz label maps")
    return [CaseSource(folder.name, nifti_stem(path), "mri", classes, _labels_only(path)) for path in maps]


def nifti_stem(path: Path) -> str:
    """A NIfTI file's name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def _image_and_labels(image: Path, labels: Path) -> LoadArrays:
    return lambda: (load_volume(image), read_labels(labels))


def _labels_only(labels: Path) -> LoadArrays:
    return lambda: (None, read_labels(labels))


def mask_files_case(image: Path, masks: Sequence[Path], *, modality: str, dataset: str, case_id: str) -> CaseSource:
    """An image and binary masks, numbered from 1 in the given order; each class is its file's stem.

    Overlaps: see :func:`merge_masks`. Files are read by ``load``.

    Raises:
        SatInputError: the modality is unknown.
    """
    classes = {value: nifti_stem(path) for value, path in enumerate(masks, start=1)}

    def read() -> tuple[Volume, Volume]:
        volume = load_volume(image)
        return volume, merge_masks(volume, masks)

    return CaseSource(dataset, case_id, check_modality(modality), classes, read)


def _manifest_line(line: str, where: str, folder: Path, default_dataset: str) -> CaseSource:
    """One manifest line as a case (see :func:`manifest_cases`)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise SatInputError(f"{where} is not JSON: {error}") from error
    if not isinstance(entry, dict):
        raise SatInputError(f"{where}: expected a JSON object")
    for key in ("image", "label", "modality"):
        if key not in entry:
            raise SatInputError(f'{where}: no "{key}"; each line needs "image", "label" and "modality"')
    image = folder / _string(entry, "image", where)
    modality = modality_from_name(_string(entry, "modality", where))
    dataset = _string(entry, "dataset", where) if "dataset" in entry else default_dataset
    case_id = _string(entry, "case", where) if "case" in entry else nifti_stem(image)
    label = entry["label"]
    if isinstance(label, list) and label and all(isinstance(item, str) for item in label):
        masks = [folder / item for item in label]
        return mask_files_case(image, masks, modality=modality, dataset=dataset, case_id=case_id)
    if not isinstance(label, str):
        raise SatInputError(f'{where}: "label" must be a label map path or a non-empty list of mask paths')
    classes = entry.get("classes")
    if isinstance(classes, str):
        names = read_names(folder / classes)
    elif isinstance(classes, dict):
        names = _names_from_object(classes, where, '"classes" {"1": "liver", ...}')
    else:
        raise SatInputError(f'{where}: a label map needs "classes": {{"1": "liver", ...}} or the path of such a JSON')
    return CaseSource(dataset, case_id, modality, names, _image_and_labels(image, folder / label))


def _nnunet_classes(labels: Any, where: str) -> dict[int, str]:
    """Classes from nnU-Net's ``labels``: v2 ``{"liver": 1}`` or v1 ``{"1": "liver"}``; 0 left out."""
    if not isinstance(labels, dict) or not labels:
        raise SatInputError(f'{where}: no "labels" object')
    if any(isinstance(value, list) for value in labels.values()):
        raise SatInputError(f"{where}: region-based labels (lists of values) are not supported; one value per name")
    if all(isinstance(value, int) and not isinstance(value, bool) for value in labels.values()):
        labels = {str(value): name for name, value in labels.items()}
    return _names_from_object(labels, where, '"labels" {"liver": 1, ...}')


def _names_from_object(document: Mapping[str, Any], where: str, expected: str) -> dict[int, str]:
    """``{value: name}`` from ``{"<value>": "<name>"}``, value 0 (background) left out."""
    names: dict[int, str] = {}
    for key, name in document.items():
        if not (isinstance(key, str) and key.strip().isdigit() and isinstance(name, str) and name.strip()):
            raise SatInputError(f"{where}: entry {key!r}: {name!r} is not a label value and name; expected {expected}")
        if int(key) > np.iinfo(np.uint16).max:
            raise SatInputError(f"{where}: label value {key} is above 65535")
        if int(key) != 0:
            names[int(key)] = name
    return dict(sorted(names.items()))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError as error:
        raise SatInputError(f"no such file: {path}") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SatInputError(f"cannot read JSON {path}: {' '.join(str(error).split())}") from error


def _string(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise SatInputError(f'{where}: "{key}" must be a non-empty string')
    return value


def _nifti_files(folder: Path, endings: tuple[str, ...] = NIFTI_ENDINGS) -> list[Path]:
    """The NIfTI files in ``folder`` by name, hidden ones (``._x.nii.gz`` from macOS) left out."""
    return sorted(
        path for path in folder.iterdir() if path.is_file() and path.name.endswith(endings) and path.name[0] != "."
    )
