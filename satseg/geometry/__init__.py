"""Volumes and their geometry: reading and validating NIfTI / DICOM (numpy, nibabel and pydicom only), the
lowest layer of the package. The model's preprocessing and its inverse are the engine's
(:mod:`satseg.engine.preprocess`)."""

from satseg.geometry.io import load_dicom_series, load_nifti, load_volume, validate_volume
from satseg.geometry.volume import MODALITIES, Volume

__all__ = [
    "MODALITIES",
    "Volume",
    "load_dicom_series",
    "load_nifti",
    "load_volume",
    "validate_volume",
]
