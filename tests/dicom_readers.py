"""Readers of our DICOM outputs that share no code with the writers: pydicom, DICOM's own pixel-to-patient
formula, and matplotlib's point-in-polygon. Each places what it reads on a volume's grid through the world
(patient) coordinates, so a flip, a shift or a slice mix-up shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from matplotlib.path import Path as Polygon

from satseg.geometry import Volume


def read_series(folder: Path) -> dict[str, pydicom.Dataset]:
    """The series' slices by SOP instance UID, read with pydicom alone."""
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(path) for path in sorted(folder.iterdir()))}


def voxel_indices(volume: Volume, lps: np.ndarray) -> np.ndarray:
    """``[P, 3]`` patient (LPS) mm -> ``[P, 3]`` integer voxel indices of ``volume`` (RAS+ affine), checked to
    land on voxel centres."""
    ras = lps * np.array([-1.0, -1.0, 1.0])
    index = (np.linalg.inv(volume.affine) @ np.c_[ras, np.ones(len(ras))].T).T[:, :3]
    rounded = np.rint(index)
    assert np.abs(index - rounded).max() < 1e-3, "an output pixel is off the input's voxel centres"
    return rounded.astype(int)


def pixel_world(
    origin: np.ndarray, orientation: np.ndarray, spacing: np.ndarray, rows: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """Patient mm of pixels (``rows``, ``columns``) of a plane at ``origin`` (DICOM's own formula)."""
    row_cosine, column_cosine = np.reshape(np.asarray(orientation, dtype=np.float64), (2, 3))
    between_rows, between_columns = (float(value) for value in spacing)
    return (
        np.asarray(origin, dtype=np.float64)
        + np.outer(columns * between_columns, row_cosine)
        + np.outer(rows * between_rows, column_cosine)
    )


def place(volume: Volume, lps: np.ndarray) -> np.ndarray:
    """A mask of ``volume``'s grid holding the voxels at ``lps``."""
    mask = np.zeros(volume.shape, np.uint8)
    if len(lps):
        index = voxel_indices(volume, lps)
        mask[index[:, 0], index[:, 1], index[:, 2]] = 1
    return mask


def seg_masks(seg: pydicom.Dataset, volume: Volume) -> np.ndarray:
    """The SEG's segments on ``volume``'s grid, each frame placed by its own plane position."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    found = np.zeros((len(seg.SegmentSequence), *volume.shape), np.uint8)
    for frame, groups in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        rows, columns = np.nonzero(pixels[frame])
        origin = groups.PlanePositionSequence[0].ImagePositionPatient
        found[segment - 1] |= place(volume, pixel_world(origin, orientation, spacing, rows, columns))
    return found


def contour_fill(points_lps: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """``[rows, columns]`` bool: the pixel centres of ``source`` inside a closed contour lying on its plane."""
    origin = np.asarray(source.ImagePositionPatient, dtype=np.float64)
    row_cosine, column_cosine = np.reshape(np.asarray(source.ImageOrientationPatient, dtype=np.float64), (2, 3))
    offset = points_lps - origin
    assert np.abs(offset @ np.cross(row_cosine, column_cosine)).max() < 1e-3, "a contour off its slice's plane"
    between_rows, between_columns = (float(value) for value in source.PixelSpacing)
    polygon = Polygon(np.c_[offset @ row_cosine / between_columns, offset @ column_cosine / between_rows])
    rows, columns = np.mgrid[: source.Rows, : source.Columns]
    return polygon.contains_points(np.c_[columns.ravel(), rows.ravel()]).reshape(source.Rows, source.Columns)


def rtstruct_masks(
    rtstruct: pydicom.Dataset, series: dict[str, pydicom.Dataset], volume: Volume
) -> dict[str, np.ndarray]:
    """Each ROI filled on ``volume``'s grid: per referenced slice, its contours combined by the even-odd rule."""
    names = {roi.ROINumber: str(roi.ROIName) for roi in rtstruct.StructureSetROISequence}
    found = {}
    for roi in rtstruct.ROIContourSequence:
        slices: dict[str, np.ndarray] = {}
        for contour in getattr(roi, "ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            uid = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            source = series[uid]
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            inside = contour_fill(points, source)
            slices[uid] = slices.get(uid, np.zeros_like(inside)) ^ inside
        mask = np.zeros(volume.shape, np.uint8)
        for uid, inside in slices.items():
            rows, columns = np.nonzero(inside)
            source = series[uid]
            world = pixel_world(
                source.ImagePositionPatient, source.ImageOrientationPatient, source.PixelSpacing, rows, columns
            )
            mask |= place(volume, world)
        found[names[roi.ReferencedROINumber]] = mask
    return found


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def sr_measurements(sr: pydicom.Dataset) -> dict[int, dict[str, object]]:
    """Per referenced segment number of a TID 1500 report, read from its content tree with pydicom: the SEG and
    source series it references and each numeric measurement as ``meaning: (value, UCUM unit)``."""
    found: dict[int, dict[str, object]] = {}

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "CONTAINER" and "ContentSequence" in item:
                group = {"measurements": {}}
                for child in item.ContentSequence:
                    meaning = child.ConceptNameCodeSequence[0].CodeMeaning
                    if child.ValueType == "IMAGE":
                        reference = child.ReferencedSOPSequence[0]
                        group["seg"] = str(reference.ReferencedSOPInstanceUID)
                        group["segment"] = int(reference.ReferencedSegmentNumber)
                    elif child.ValueType == "UIDREF":
                        group["source_series"] = str(child.UID)
                    elif child.ValueType == "NUM":
                        value = child.MeasuredValueSequence[0]
                        unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                        group["measurements"][meaning] = (float(value.NumericValue), str(unit))
                if "segment" in group:
                    found[group["segment"]] = group
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found
