"""DICOM SEG output through highdicom: one binary segment per prompt, referencing the source series.

A mask on the volume grid of :func:`satseg.geometry.load_dicom_series` (``[I, J, K]`` = column, row, slice,
slices sorted along the normal) becomes one frame per source slice: frame ``k`` is ``mask[:, :, k].T``
(``[rows, columns]``) of the ``k``-th slice of :func:`satseg.geometry.io.sorted_series_headers`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from satseg import __version__
from satseg.atomic import atomic_file
from satseg.errors import SatInputError
from satseg.geometry.io import sorted_series_headers
from satseg.outputs.preview import term_colour

SEG_FILE = "segmentation.dcm"
SERIES_DESCRIPTION = "SAT AI segmentation - not for clinical use"
PRIVATE_SCHEME = "99SATSEG"
"""Coding scheme of terms DICOM's own code dictionary has no concept for (the term itself is the meaning)."""
SERIES_NUMBER = 9901
SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
"""The UIDs every DICOM result references its source by (anonymised series sometimes have them empty)."""


def missing_uid(dataset: pydicom.Dataset) -> str:
    """The first of :data:`SOURCE_UIDS` that ``dataset`` has absent or empty, or ``""``."""
    return next((name for name in SOURCE_UIDS if not str(dataset.get(name, "")).strip()), "")


def empty_uid_reason(name: str) -> str:
    """Why a source whose ``name`` UID is empty gets no DICOM result: the one answer of every path (the node,
    ``sat-client``, :class:`~satseg_clients.SATClient`); a NIfTI result needs no UID and is still made."""
    return (
        f"its {name} is empty; a PACS cannot file it and no SEG could reference it (give the series its UIDs, "
        "e.g. in the anonymiser, and send it again; NIfTI output needs none)"
    )


def source_slices(series_folder: Path, masks: np.ndarray, output: str) -> list[pydicom.Dataset]:
    """The source series' slices in the volume's slice order (:func:`sorted_series_headers`), refused in one line
    where a UID a DICOM result must reference is empty, or where ``masks`` (``[N, I, J, K]``) are not on their
    grid; ``output`` names the result in that line."""
    sources = [pydicom.dcmread(file) for file, _ in sorted_series_headers(series_folder)]
    for number, source in enumerate(sources, 1):
        if missing := missing_uid(source):
            raise SatInputError(
                f"no {output} for this series: slice {number} of {len(sources)}: " + empty_uid_reason(missing)
            )
    if masks.shape[1:] != (sources[0].Columns, sources[0].Rows, len(sources)):
        raise SatInputError(f"masks {list(masks.shape[1:])} do not lie on the source series' grid")
    return sources


def highdicom_module() -> Any:
    """highdicom, imported on first use; a one-line refusal where the install lacks it."""
    try:
        import highdicom
    except ImportError:
        raise SatInputError('DICOM SEG and SR output need highdicom: pip install ".[client]"') from None
    return highdicom


def property_type(term: str) -> Any:
    """The coded concept of ``term``: DICOM's SNOMED CT concept of that name where pydicom's dictionary has
    one ("left kidney" -> ``codes.SCT.LeftKidney``), else a private code whose meaning is the term."""
    from pydicom.sr.codedict import codes

    highdicom = highdicom_module()
    keyword = "".join(word.capitalize() for word in re.split(r"[^a-z0-9]+", term.lower()) if word)
    try:
        code = getattr(codes.SCT, keyword)
        return highdicom.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    except AttributeError:
        return highdicom.sr.CodedConcept(re.sub(r"[^a-z0-9]+", "-", term.lower()), PRIVATE_SCHEME, term)


def frames(masks: np.ndarray) -> np.ndarray:
    """``[N, I, J, K]`` masks -> ``[K, rows=J, columns=I, N]`` frames, one per source slice."""
    return np.ascontiguousarray(np.transpose(masks, (3, 2, 1, 0)).astype(bool))


def fill_slice_thickness(sources: Sequence[pydicom.Dataset]) -> None:
    """Give in-memory source headers a SliceThickness where it is absent or empty (type 2 in CT and MR),
    as highdicom reads it for the SEG's pixel measures: the slice spacing stands in for it."""
    if len(sources) < 2:
        return
    first, second = (np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in sources[:2])
    spacing = round(float(np.linalg.norm(second - first)), 6)
    for ds in sources:
        if ds.get("SliceThickness") in (None, ""):
            ds.SliceThickness = spacing


def result_uids(source_series_uid: str, model: str, output: str = "dicom_seg") -> tuple[str, str]:
    """The series and SOP instance UIDs of one ``output`` (``dicom_seg`` or ``rtstruct``) for one source series
    and one model: the same every time, so a result sent twice (a crash between sending and recording it) is one
    instance to the PACS."""
    from pydicom.uid import generate_uid

    parts = ("series", "instance") if output == "dicom_seg" else (f"{output} series", f"{output} instance")
    series, instance = (generate_uid(entropy_srcs=[source_series_uid, model, part]) for part in parts)
    return series, instance


def write_dicom_seg(
    masks: np.ndarray,
    labels: Sequence[str],
    series_folder: Path,
    path: Path,
    *,
    model: str = "",
    series_uid: str | None = None,
    instance_uid: str | None = None,
) -> Path:
    """Write a binary DICOM SEG of ``masks`` (``[N, I, J, K]`` on the series' grid) referencing the series.

    Args:
        masks: one uint8 mask per label, on the grid :func:`satseg.geometry.load_dicom_series` gives.
        labels: the term of each mask (segment labels; codes where DICOM has them).
        series_folder: the source series, whose headers the SEG references.
        path: the ``.dcm`` file to write (atomically).
        model: the served model's hash, recorded as the algorithm's ``model`` parameter.
        series_uid, instance_uid: the SEG's own UIDs (default: new ones); a caller that must not make two
            results of one input passes UIDs derived from it (see :func:`result_uids`).
    """
    from pydicom.sr.codedict import codes

    highdicom = highdicom_module()
    sources = source_slices(series_folder, masks, "DICOM SEG")
    fill_slice_thickness(sources)
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="SAT",
        version=__version__,
        family=codes.cid7162.ArtificialIntelligence,
        parameters={"model": model} if model else None,
    )
    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=number,
            segment_label=label[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=property_type(label),
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=highdicom.color.CIELabColor.from_rgb(*term_colour(label)),
        )
        for number, label in enumerate(labels, start=1)
    ]
    segmentation = highdicom.seg.Segmentation(
        source_images=sources,
        pixel_array=frames(masks),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid or highdicom.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid or highdicom.UID(),
        instance_number=1,
        manufacturer="satseg",
        manufacturer_model_name="SAT",
        software_versions=__version__,
        device_serial_number="none",
        series_description=SERIES_DESCRIPTION,
        omit_empty_frames=False,
    )
    with atomic_file(path) as file:
        segmentation.save_as(file)
    return path


def read_dicom_seg(seg: pydicom.Dataset, series_folder: Path) -> tuple[np.ndarray, list[str]]:
    """A binary SEG's frames back on its source series' grid: ``[N, I, J, K]`` uint8 masks and the segment labels.

    Each frame is placed by the source instance it references, so this is the inverse of :func:`write_dicom_seg`
    for any frame order a PACS may give back.
    """
    slice_of = {ds.SOPInstanceUID: k for k, (_, ds) in enumerate(sorted_series_headers(series_folder))}
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    masks = np.zeros((len(seg.SegmentSequence), seg.Columns, seg.Rows, len(slice_of)), np.uint8)
    for frame, groups in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        if source not in slice_of:
            raise SatInputError("the SEG references an instance that is not in the source series")
        segment = groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        masks[segment - 1, :, :, slice_of[source]] = pixels[frame].T
    return masks, [str(item.SegmentLabel) for item in seg.SegmentSequence]
