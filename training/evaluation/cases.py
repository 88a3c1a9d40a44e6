"""Labelled cases to evaluate, each on its own grid, and the second grids (``--geometry``) they are re-evaluated on."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage
from scipy.spatial.transform import Rotation

from satseg.errors import SatInputError
from satseg.geometry import Volume, load_volume
from satseg.geometry.volume import check_modality
from satseg.spec import PreprocessConfig
from satseg.text import Vocabulary
from satseg_training.data.mni152 import MNI152_SIDED_TISSUES, load_mni152, sided_tissues
from satseg_training.data.names import map_label_names
from satseg_training.data.readers import (
    check_same_grid,
    mask_files_case,
    mask_folder_case,
    nifti_stem,
    read_labels,
    read_names,
)
from satseg_training.data.standardised import StandardisedDataset

INPUT_GEOMETRY = "input"
OBLIQUE = "oblique"
CONTRASTS = ("any", "t1")
"""How label-only maps are synthesised: any contrast per label, or named tissues in T1-weighted order."""


@dataclass(frozen=True)
class EvaluationCase:
    """One labelled volume on its own grid.

    Attributes:
        name: shown in the reports.
        volume: the image as a user would pass it to ``sat-segment``.
        labels: ``[I, J, K]`` integer label values on ``volume``'s grid, 0 background.
        classes: label value -> canonical vocabulary term (several values may share a term).
        modality: one of ``MODALITIES``.
    """

    name: str
    volume: Volume
    labels: np.ndarray
    classes: dict[int, str]
    modality: str


def check_geometry(geometry: str) -> str:
    """``geometry`` in its canonical spelling: ``input``, axis codes (``lps``) or ``obliqueN`` (``oblique15``).

    Raises:
        SatInputError: any other name.
    """
    name = geometry.strip().lower()
    if name == INPUT_GEOMETRY:
        return name
    if name.startswith(OBLIQUE):
        try:
            float(name[len(OBLIQUE) :])
        except ValueError:
            raise SatInputError(f"geometry {geometry!r}: expected obliqueN with N in degrees, e.g. oblique15") from None
        return name
    try:
        PreprocessConfig(orientation=name.upper())  # the model grid's own check of axis codes
    except SatInputError as error:
        raise SatInputError(f"geometry {geometry!r}: expected input, obliqueN or axis codes; {error}") from None
    return name


def regrid(volume: Volume, labels: np.ndarray, geometry: str) -> tuple[Volume, np.ndarray]:
    """The same world content on another grid: ``(volume, labels)`` for ``geometry`` (see :func:`check_geometry`).

    Axis codes reorient exactly (a signed permutation of the arrays); ``obliqueN`` resamples (:func:`_rotated`).
    """
    name = check_geometry(geometry)
    if name == INPUT_GEOMETRY:
        return volume, labels
    if name.startswith(OBLIQUE):
        return _rotated(volume, labels, float(name[len(OBLIQUE) :]))
    ornt = ornt_transform(io_orientation(volume.affine), axcodes2ornt(tuple(name.upper())))
    affine = volume.affine @ inv_ornt_aff(ornt, volume.shape)
    array = np.ascontiguousarray(apply_orientation(volume.array, ornt))
    return Volume(array, affine, volume.modality), np.ascontiguousarray(apply_orientation(labels, ornt))


def _rotated(volume: Volume, labels: np.ndarray, degrees: float) -> tuple[Volume, np.ndarray]:
    """A grid whose voxel axes are rotated ``degrees`` about world z then x, same spacing, covering the input.

    The image is resampled linearly (outside the input: its minimum, air for CT), the labels by nearest
    neighbour (outside: 0).
    """
    direction = Rotation.from_euler("zx", [degrees, degrees], degrees=True).as_matrix() @ volume.affine[:3, :3]
    corners = np.array(np.meshgrid(*[[-0.5, size - 0.5] for size in volume.shape], indexing="ij")).reshape(3, -1)
    world = volume.affine[:3, :3] @ corners + volume.affine[:3, 3:4]
    positions = np.linalg.solve(direction, world)  # the corners in voxel units of the rotated axes
    low = np.ceil(positions.min(axis=1))
    shape = tuple(int(size) for size in np.floor(positions.max(axis=1)) - low + 1)
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = direction @ low
    new_to_old = np.linalg.solve(volume.affine, affine)
    matrix, offset = new_to_old[:3, :3], new_to_old[:3, 3]
    image = ndimage.affine_transform(
        volume.array.astype(np.float32),
        matrix,
        offset,
        output_shape=shape,
        order=1,
        mode="grid-constant",
        cval=float(volume.array.min()),
    )
    resampled = ndimage.affine_transform(
        labels, matrix, offset, output_shape=shape, order=0, mode="grid-constant", cval=0
    )
    return Volume(image, affine, volume.modality), resampled


def case_from_files(
    image: Path, labels: Path, names: Path | Mapping[int, str], modality: str, vocabulary: Vocabulary
) -> EvaluationCase:
    """A case from an image, its label map and the label names (a JSON file ``{"1": "spleen"}`` or a mapping).

    Names are resolved to vocabulary terms ("kidney_left" -> "left kidney"); unresolved ones are left out
    (with a warning).

    Raises:
        SatInputError: unreadable files, labels off the image's grid, an unknown modality.
    """
    raw = read_names(Path(names)) if isinstance(names, Path | str) else dict(names)
    volume, label_volume = load_volume(image), read_labels(Path(labels))
    check_same_grid(volume, label_volume, f"labels {Path(labels).name}")
    name = nifti_stem(Path(image))
    mapped, _ = map_label_names(raw, vocabulary, source=f"case {name}")
    return EvaluationCase(name, volume, label_volume.array, mapped, check_modality(modality))


def case_from_masks(image: Path, masks: Path, modality: str, vocabulary: Vocabulary) -> EvaluationCase:
    """A case from an image and binary masks named ``<structure>.nii.gz`` (TotalSegmentator's layout): one
    mask file, or a folder of them (:func:`satseg_training.data.readers.mask_folder_case`); named after the folder.

    One file keeps its structure whole where a folder's masks overlap (a later file wins there: an aorta
    under its lumens' masks).

    Raises:
        SatInputError: unreadable files, a mask off the image's grid, an empty folder, an unknown modality.
    """
    masks = Path(masks)
    if masks.is_dir():
        source = mask_folder_case(Path(image), masks, modality=modality, dataset="evaluation")
    else:
        name = masks.parent.name
        source = mask_files_case(Path(image), [masks], modality=modality, dataset="evaluation", case_id=name)
    loaded = source.load()
    assert loaded.image is not None  # masks always come with their image
    mapped, _ = map_label_names(loaded.classes, vocabulary, source=f"masks {masks.name}")
    return EvaluationCase(loaded.case_id, loaded.image, loaded.labels, mapped, loaded.modality)


def mni152_case() -> EvaluationCase:
    """nilearn's MNI152 2009 T1 template scored against its white/grey-matter maps (see
    ``satseg_training.data.mni152``), each split into hemispheres at the midline: "cerebral white matter" is
    scored against both, "left cerebral white matter" against its half."""
    volume, labels = load_mni152()
    sided = sided_tissues(labels, volume.affine)
    return EvaluationCase("mni152_2009_nilearn", volume, sided, dict(MNI152_SIDED_TISSUES), "mri")


def standardised_cases(
    root: Path, keys: Sequence[str] | None, seed: int = 0, contrast: str = CONTRASTS[0]
) -> list[EvaluationCase]:
    """Cases of a standardised root (all, or those whose ``<dataset>/<case>`` key is in ``keys``).

    Their grid is the standardised model grid (the original is not kept). Label-only maps get an image
    synthesised with a generator seeded by ``seed`` and the case key, so reruns see the same image, in
    ``contrast`` (one of :data:`CONTRASTS`: ``"t1"`` puts the named tissues in T1-weighted order).
    Non-CT images are shifted to start at 0: they are z-scored, and the MRI/PET foreground crop keeps
    values above 0, while the normalisation itself ignores a shift.

    Raises:
        SatInputError: an unreadable root, or a key naming no case.
    """
    dataset = StandardisedDataset(root)
    index = {entry.case: position for position, entry in enumerate(dataset.cases)}
    wanted = list(index) if keys is None else list(keys)
    missing = [key for key in wanted if key not in index]
    if missing:
        raise SatInputError(f"cases not in {root / 'manifest.jsonl'}: {', '.join(missing)}")
    cases = []
    for key in wanted:
        image, labels, entry = dataset.load(index[key])
        if image is None:
            from satseg_training.data.synthseg import synthesize_image, t1_mean_ranges  # only label-only maps need it

            rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
            ranges = t1_mean_ranges(entry.classes) if contrast == "t1" else None
            image = synthesize_image(labels, rng, mean_ranges=ranges)  # on the model grid, its default spacing
        if entry.modality != "ct":
            image = image - image.min()
        volume = Volume(image, entry.affine, entry.modality)
        cases.append(EvaluationCase(key, volume, labels, dict(entry.classes), entry.modality))
    return cases
