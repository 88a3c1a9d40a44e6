"""Volumes and their geometry: reading NIfTI / DICOM, and the model's preprocessing with its inverse.

Reading and validating import numpy, nibabel and pydicom only; the preprocessing (torch, MONAI) is imported
when first used.
"""

from satseg.geometry.io import load_dicom_series, load_nifti, load_volume, validate_volume
from satseg.geometry.volume import MODALITIES, Volume
from satseg.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {name: "preprocess" for name in ("PreparedVolume", "PreprocessConfig", "normalize_intensity", "prepare")},
)

__all__ = [
    "MODALITIES",
    "PreparedVolume",
    "PreprocessConfig",
    "Volume",
    "load_dicom_series",
    "load_nifti",
    "load_volume",
    "normalize_intensity",
    "prepare",
    "validate_volume",
]
