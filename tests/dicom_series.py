"""Synthetic single-frame DICOM series for tests: oblique, with known positions."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROW_COSINE = np.array([np.cos(0.3), np.sin(0.3), 0.0])
COL_COSINE = np.array([-np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), -np.sin(0.2)])
PIXEL_SPACING = (0.8, 0.6)  # (between rows, between columns) as DICOM lists them
ORIGIN = np.array([-100.0, -80.0, 40.0])
SLICE_GAP = 2.0


def distinct_hu(shape: tuple[int, int, int]) -> np.ndarray:
    """Distinct HU per voxel: [I, J, K] int16."""
    return (np.arange(np.prod(shape)).reshape(shape) * 7 % 2500 - 1024).astype(np.int16)


def write_series(
    folder: Path,
    hu: np.ndarray,
    slices: list[int] | None = None,
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    pixel_spacing: tuple[float, float] = PIXEL_SPACING,
    slice_gap: float = SLICE_GAP,
    orientation: tuple[np.ndarray, np.ndarray] = (ROW_COSINE, COL_COSINE),
    shuffled_instances: bool = False,
) -> None:
    """Single-frame DICOM files of ``hu`` [I=Columns, J=Rows, K] under random names, in random order.

    Slice ``k`` lies at ``ORIGIN + k * slice_gap * (row x column cosine)`` (a negative gap runs against the
    normal); ``orientation`` is the (row, column) direction cosines; ``shuffled_instances`` gives the slices
    instance numbers that do not follow their position. The patient, study and frame-of-reference tags are
    there too, as a DICOM SEG of the series needs them.
    """
    folder.mkdir(exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_of_reference = generate_uid(), generate_uid()
    row_cosine, column_cosine = (np.asarray(cosine, dtype=np.float64) for cosine in orientation)
    normal = np.cross(row_cosine, column_cosine)
    stored = np.round((hu - intercept) / slope).astype(np.uint16)
    order = list(range(hu.shape[2])) if slices is None else slices
    random.Random(len(order)).shuffle(order)
    numbers = {k: (order.index(k) if shuffled_instances else k) + 1 for k in order}
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = modality, series_uid, numbers[k]
        ds.ImageOrientationPatient = [*row_cosine, *column_cosine]
        ds.ImagePositionPatient = list(ORIGIN + k * slice_gap * normal)
        ds.PixelSpacing = list(pixel_spacing)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesNumber = study_uid, frame_of_reference, 1
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM-1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "satseg tests"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows of the image are J
        ds.save_as(folder / f"{generate_uid()[-12:]}.dcm", enforce_file_format=True)
