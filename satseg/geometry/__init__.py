"""Volumes and their geometry: reading NIfTI / DICOM, and the model's preprocessing with its inverse."""

from satseg.geometry.io import load_dicom_series, load_nifti, load_volume, validate_volume
from satseg.geometry.preprocess import PreparedVolume, PreprocessConfig, normalize_intensity, prepare
from satseg.geometry.volume import MODALITIES, Volume

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
