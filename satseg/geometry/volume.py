"""The volume type: geometry travels with the array."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from satseg.errors import SatInputError

MODALITIES: tuple[str, ...] = ("ct", "mri", "us", "pet")
"""Modality names in the order of the model's modality embedding (ct = 0, mri = 1, us = 2, pet = 3)."""


def check_modality(modality: str) -> str:
    """``modality`` in its canonical lower-case spelling, one of :data:`MODALITIES`.

    Raises:
        SatInputError: any other name.
    """
    name = modality.strip().lower()
    if name not in MODALITIES:
        raise SatInputError(f'unknown modality "{modality}"; accepted: {", ".join(MODALITIES)}')
    return name


def choose_modality(requested: str | None, from_file: str | None) -> str:
    """The one rule for a volume's modality, at every entry point: the one asked for, else the file's (a DICOM
    header's), else a refusal; nothing is assumed, since the modality picks the intensity normalisation.

    Raises:
        SatInputError: neither is known, or the one asked for is not a modality name.
    """
    if requested:
        return check_modality(requested)
    if from_file:
        return check_modality(from_file)
    raise SatInputError(
        f"the modality is not known from the file (NIfTI has none); pass --modality {'|'.join(MODALITIES)}"
    )


@dataclass(frozen=True)
class Volume:
    """A 3D scalar image and where it lies in the world.

    Attributes:
        array: ``[I, J, K]`` voxel values in the order they are stored on disk
            (any real dtype: int16 HU for CT, float for MR/PET).
        affine: ``[4, 4]`` float64 map from voxel indices ``(i, j, k, 1)`` to
            RAS+ world millimetres (the NIfTI convention; DICOM's LPS is converted).
        modality: one of :data:`MODALITIES` when the source says so (DICOM tag), else ``None``.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis, ``[3]`` float64."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (|det| of the 3x3 part, mm^3 / 1000)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)
