"""RT Structure Set output: one ROI per prompt, closed planar contours on each source slice's own plane.

Written with pydicom by hand, with the contours from contourpy (which matplotlib already brings): rt-utils,
the library that writes RTSTRUCTs, would pull OpenCV (about 90 MB) into the torch-free client.

A mask on the volume grid of :func:`satseg.geometry.load_dicom_series` (``[I, J, K]`` = column, row, slice,
slices sorted along the normal) is contoured slice by slice: the contours of ``mask[:, :, k]`` lie on the
``k``-th slice of :func:`satseg.geometry.io.sorted_series_headers`, placed by that slice's own position,
orientation and pixel spacing, and reference that slice's SOP instance. They are marching-squares isolines at
0.5, so they pass half-way between the voxel centres inside and outside a structure: a reader that fills a
slice's contours by the even-odd rule (a hole is a contour inside a contour) gets every voxel back, except
where two voxels of a structure touch only at a corner.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import contourpy
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from satseg import __version__
from satseg.atomic import atomic_file
from satseg.outputs.preview import term_colour
from satseg_clients.dicom_seg import SERIES_DESCRIPTION, source_slices

RTSTRUCT_FILE = "rtstruct.dcm"
SERIES_NUMBER = 9902
STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"
"""The SOP class an RT Structure Set names its referenced study by (PS3.3 C.8.8.5, retired but required)."""
COPIED_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
"""The patient and study of the source series, which the structure set belongs to (type 2: empty if absent)."""
DECIMALS = 3
"""Contour points in 0.001 mm: a DS value holds at most 16 characters."""


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The closed contours of a ``[I, J]`` binary slice, each ``[P, 2]`` float ``(i, j)`` voxel indices (voxel
    centres at integers), without its repeated closing point."""
    padded = np.pad(mask.astype(np.float64), 1)  # a zero border, so that every contour closes
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    contours = []
    for line in lines:  # (x, y) = (column, row) of ``padded``: (j + 1, i + 1)
        points = np.asarray(line, dtype=np.float64)[:, ::-1] - 1.0
        if len(points) > 1 and np.allclose(points[0], points[-1]):
            points = points[:-1]
        if len(points) >= 3:
            contours.append(points)
    return contours


def patient_points(points: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """``[P, 2]`` ``(i, j)`` = (column, row) indices of ``source``'s pixels -> ``[P, 3]`` patient (LPS) mm."""
    position = np.asarray(source.ImagePositionPatient, dtype=np.float64)
    row_cosine, column_cosine = np.reshape(np.asarray(source.ImageOrientationPatient, dtype=np.float64), (2, 3))
    between_rows, between_columns = (float(value) for value in source.PixelSpacing)
    return (
        position
        + np.outer(points[:, 0] * between_columns, row_cosine)
        + np.outer(points[:, 1] * between_rows, column_cosine)
    )


def _item(**values: object) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _reference(source: pydicom.Dataset) -> pydicom.Dataset:
    return _item(ReferencedSOPClassUID=source.SOPClassUID, ReferencedSOPInstanceUID=source.SOPInstanceUID)


def _contours(mask: np.ndarray, sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    items = []
    for k, source in enumerate(sources):
        for points in slice_contours(mask[:, :, k]):
            world = patient_points(points, source)
            items.append(
                _item(
                    ContourImageSequence=[_reference(source)],
                    ContourGeometricType="CLOSED_PLANAR",
                    NumberOfContourPoints=len(world),
                    ContourData=[f"{value:.{DECIMALS}f}" for value in world.reshape(-1)],
                )
            )
    return items


def write_rtstruct(
    masks: np.ndarray,
    labels: Sequence[str],
    series_folder: Path,
    path: Path,
    *,
    model: str = "",
    series_uid: str | None = None,
    instance_uid: str | None = None,
) -> Path:
    """Write an RT Structure Set of ``masks`` (``[N, I, J, K]`` on the series' grid) referencing the series.

    Args:
        masks: one uint8 mask per label, on the grid :func:`satseg.geometry.load_dicom_series` gives.
        labels: the term of each mask (the ROI names).
        series_folder: the source series, whose slices the contours lie on and reference.
        path: the ``.dcm`` file to write (atomically).
        model: the served model's hash, recorded in each ROI's generation description.
        series_uid, instance_uid: the structure set's own UIDs (default: new ones).
    """
    sources = source_slices(series_folder, masks, "RT Structure Set")
    first = sources[0]
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = instance_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword in COPIED_FROM_SOURCE:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", series_uid or generate_uid(), SERIES_NUMBER
    ds.SeriesDescription, ds.InstanceNumber, ds.OperatorsName = SERIES_DESCRIPTION, 1, ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "satseg", "SAT", __version__
    ds.InstanceCreationDate = ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.StructureSetTime = now.strftime("%H%M%S")
    ds.StructureSetLabel = "SAT AI"
    ds.StructureSetDescription = "AI-generated (SAT) - not for clinical use"
    frame_of_reference = first.FrameOfReferenceUID
    ds.FrameOfReferenceUID = frame_of_reference  # the Frame of Reference module the IOD now includes
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    series = _item(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=[_reference(s) for s in sources])
    study = _item(
        ReferencedSOPClassUID=STUDY_COMPONENT_CLASS,
        ReferencedSOPInstanceUID=first.StudyInstanceUID,
        RTReferencedSeriesSequence=[series],
    )
    ds.ReferencedFrameOfReferenceSequence = [
        _item(FrameOfReferenceUID=frame_of_reference, RTReferencedStudySequence=[study])
    ]
    described = f"SAT {__version__} model {model[:12] or 'unknown'}, AI-generated, not for clinical use"
    ds.StructureSetROISequence = [
        _item(
            ROINumber=number,
            ReferencedFrameOfReferenceUID=frame_of_reference,
            ROIName=label[:64],
            ROIGenerationAlgorithm="AUTOMATIC",
            ROIGenerationDescription=described[:64],
        )
        for number, label in enumerate(labels, start=1)
    ]
    ds.ROIContourSequence = []
    for number, (label, mask) in enumerate(zip(labels, masks, strict=True), start=1):
        roi = _item(ReferencedROINumber=number, ROIDisplayColor=list(term_colour(label)))
        if contours := _contours(mask, sources):  # an empty structure has an ROI and no contour
            roi.ContourSequence = contours
        ds.ROIContourSequence.append(roi)
    ds.RTROIObservationsSequence = [
        _item(ObservationNumber=number, ReferencedROINumber=number, RTROIInterpretedType="ORGAN", ROIInterpreter="")
        for number in range(1, len(labels) + 1)
    ]
    with atomic_file(path) as file:
        ds.save_as(file, enforce_file_format=True)
    return path
