"""A DICOM measurement report (Comprehensive 3D SR, TID 1500) of a result: per structure, its volume in mL and
its mean intensity, each referencing its segment of the result's DICOM SEG and the source series, so that the
volumes reach the archive beside the masks. Written with highdicom's ``sr`` module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from satseg import __version__
from satseg.atomic import atomic_file
from satseg_clients.dicom_seg import SERIES_DESCRIPTION, highdicom_module, property_type

SR_FILE = "measurements.dcm"
SERIES_NUMBER = 9903
MILLILITRE = ("mL", "UCUM", "milliliter")
"""UCUM's millilitre (pydicom's code dictionary has no name for it)."""


def intensity_unit(modality: str) -> Any:
    """The unit of the image's intensities (``modality`` as the engine names it): Hounsfield units for CT, none
    (UCUM ``1``) for MR, PET and ultrasound, whose intensities have no calibrated unit here."""
    from pydicom.sr.codedict import codes

    return codes.UCUM.HounsfieldUnit if modality == "ct" else codes.UCUM.NoUnits


def write_measurement_report(
    seg: pydicom.Dataset,
    statistics: Sequence[Mapping[str, Any]],
    modality: str,
    path: Path,
    *,
    model: str = "",
    series_uid: str | None = None,
    instance_uid: str | None = None,
) -> Path:
    """Write the TID 1500 measurement report of the structures of ``seg`` (the DICOM SEG of one result).

    Args:
        seg: the result's SEG, as written (its segments are referenced by number and label).
        statistics: each segment's structure's statistics, in segment order (``volume_ml``; ``intensity_mean``,
            ``None`` for an empty mask, which then reports its volume alone).
        modality: the image's (``ct``, ``mri``, ``pet``, ``us``): the unit of the mean intensity.
        path: the ``.dcm`` file to write (atomically).
        model: the served model's hash, named in the observer device.
        series_uid, instance_uid: the report's own UIDs (default: new ones).
    """
    from pydicom.sr.codedict import codes

    highdicom = highdicom_module()
    source_series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    device = highdicom.sr.DeviceObserverIdentifyingAttributes(
        uid=highdicom.UID(),
        name="SAT",
        manufacturer_name="satseg",
        model_name=f"SAT model {model[:12] or 'unknown'}",
    )
    context = highdicom.sr.ObservationContext(
        observer_device_context=highdicom.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    millilitre = highdicom.sr.CodedConcept(*MILLILITRE)
    groups = []
    for item, entry in zip(seg.SegmentSequence, statistics, strict=True):
        term = str(item.SegmentLabel)
        measurements = [highdicom.sr.Measurement(name=codes.SCT.Volume, value=entry["volume_ml"], unit=millilitre)]
        if entry.get("intensity_mean") is not None:
            measurements.append(
                highdicom.sr.Measurement(
                    name=codes.SCT.Mean, value=entry["intensity_mean"], unit=intensity_unit(modality)
                )
            )
        groups.append(
            highdicom.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=highdicom.sr.TrackingIdentifier(uid=highdicom.UID(), identifier=term[:64]),
                referenced_segment=highdicom.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=int(item.SegmentNumber),
                    source_series=highdicom.sr.SourceSeriesForSegmentation(source_series),
                ),
                finding_type=property_type(term),
                measurements=measurements,
            )
        )
    report = highdicom.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    document = highdicom.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report,
        series_instance_uid=series_uid or highdicom.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid or highdicom.UID(),
        instance_number=1,
        manufacturer="satseg",
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        institution_name=None,
    )
    document.SoftwareVersions = __version__
    with atomic_file(path) as file:
        document.save_as(file)
    return path
