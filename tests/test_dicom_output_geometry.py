"""Every DICOM output lies where its NIfTI mask lies, on flipped, oblique, sagittal, coronal and reordered
series, read back with readers we did not write, in world coordinates:

- a SEG through pydicom and its frames' own functional groups (each frame's plane position, the shared plane
  orientation and pixel measures): it must match the mask exactly;
- an RTSTRUCT by filling each contour on the plane of the instance it references, by the even-odd rule
  (matplotlib's point-in-polygon): Dice >= 0.95 per structure, the issue's bar; the marching-squares contours
  give back every voxel but where two touch only at a corner, so the measured Dice is near 1. Where rt-utils
  is installed (it needs OpenCV, so the suite does not pull it), its reader agrees with this one.

A negative control mirrors a mask and shows that the check then fails.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_readers import dice, pixel_world, place, read_series, rtstruct_masks, seg_masks, sr_measurements
from dicom_series import COL_COSINE, ROW_COSINE, write_series
from scipy import ndimage

from satseg.geometry import Volume, load_volume
from satseg_clients.dicom_seg import write_dicom_seg
from satseg_clients.measurement_report import write_measurement_report
from satseg_clients.rtstruct import write_rtstruct

pytest.importorskip("highdicom")

AXIAL = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))
VARIANTS: dict[str, dict] = {
    "axial": {"orientation": AXIAL, "slice_gap": 3.0},
    "axial_negative_spacing": {"orientation": AXIAL, "slice_gap": -3.0},
    "columns_flipped": {"orientation": (-AXIAL[0], AXIAL[1]), "slice_gap": 3.0},
    "rows_flipped": {"orientation": (AXIAL[0], -AXIAL[1]), "slice_gap": 3.0},
    "oblique": {"orientation": (ROW_COSINE, COL_COSINE), "slice_gap": 2.5},
    "sagittal": {"orientation": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])), "slice_gap": 4.0},
    "coronal": {"orientation": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])), "slice_gap": 4.0},
    "shuffled_instance_numbers": {"orientation": AXIAL, "slice_gap": 3.0, "shuffled_instances": True},
}
SHAPE = (26, 22, 9)
PIXEL_SPACING = (1.5, 1.1)  # non-square: between rows, between columns
MIN_RTSTRUCT_DICE = 0.95
LABELS = ["liver", "left kidney", "spleen"]


def series_and_masks(
    folder: Path, variant: dict, shape: tuple[int, int, int] = SHAPE, pixel_spacing: tuple[float, float] = PIXEL_SPACING
) -> tuple[Volume, np.ndarray]:
    """A series of ``variant`` and three masks on its volume grid: a blob with a hole, an asymmetric box (so a
    mirror shows), and nothing."""
    hu = np.full(shape, 40, np.int16)
    write_series(folder, hu, pixel_spacing=pixel_spacing, **variant)
    volume = load_volume(folder)
    i, j, k = np.meshgrid(*(np.arange(size) for size in volume.shape), indexing="ij")
    blob = ((i - 10) / 7.0) ** 2 + ((j - 11) / 6.0) ** 2 + ((k - 4) / 3.5) ** 2 <= 1.0
    blob &= ((i - 10) / 2.5) ** 2 + ((j - 11) / 2.0) ** 2 > 1.0  # a hole through every slice
    box = (i >= 2) & (i < 8) & (j >= 3) & (j < 18) & (k >= 1) & (k < 7)
    masks = np.stack([blob, box, np.zeros_like(box)]).astype(np.uint8)
    return volume, masks


@pytest.mark.parametrize("name", VARIANTS)
def test_seg_and_rtstruct_lie_on_the_mask_in_world_coordinates(tmp_path: Path, name: str) -> None:
    volume, masks = series_and_masks(tmp_path / "series", VARIANTS[name])
    seg = pydicom.dcmread(write_dicom_seg(masks, LABELS, tmp_path / "series", tmp_path / "seg.dcm", model="m"))
    np.testing.assert_array_equal(seg_masks(seg, volume), masks)
    rtstruct = pydicom.dcmread(write_rtstruct(masks, LABELS, tmp_path / "series", tmp_path / "rt.dcm", model="m"))
    filled = rtstruct_masks(rtstruct, read_series(tmp_path / "series"), volume)
    scores = {label: dice(filled[label], mask) for label, mask in zip(LABELS, masks, strict=True)}
    assert min(scores.values()) >= MIN_RTSTRUCT_DICE, scores
    for label, mask in zip(LABELS, masks, strict=True):  # these shapes have no voxels touching at a corner only
        np.testing.assert_array_equal(filled[label], mask, err_msg=label)
    assert not filled["spleen"].any()  # an empty structure keeps its ROI, with no contour
    mirrored = masks[1][::-1]  # negative control: a left-right mirrored box fails the same check
    assert dice(filled["left kidney"], mirrored) < MIN_RTSTRUCT_DICE
    assert not np.array_equal(seg_masks(seg, volume)[1], mirrored)
    check_measurement_report(seg, masks, volume, tmp_path)


def check_measurement_report(seg: pydicom.Dataset, masks: np.ndarray, volume: Volume, tmp_path: Path) -> None:
    """The SR reports each SEG segment by number, with the source series, its volume in mL (the mask's voxels
    times the voxel volume) and, where it has voxels, its mean in HU."""
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    statistics = [
        {"volume_ml": float(mask.sum()) * voxel_ml, "intensity_mean": 40.0 if mask.any() else None} for mask in masks
    ]
    sr = pydicom.dcmread(write_measurement_report(seg, statistics, "ct", tmp_path / "sr.dcm", model="m"))
    reported = sr_measurements(sr)
    assert sorted(reported) == [1, 2, 3]
    for number, mask in enumerate(masks, start=1):
        group = reported[number]
        assert group["seg"] == seg.SOPInstanceUID
        assert group["source_series"] == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        volume_ml, unit = group["measurements"]["Volume"]
        assert unit == "mL" and volume_ml == pytest.approx(mask.sum() * voxel_ml, rel=1e-6)
        assert ("Mean" in group["measurements"]) == bool(mask.any())
    assert sr.StudyInstanceUID == seg.StudyInstanceUID


def test_the_rtstruct_references_the_series_and_says_what_made_it(tmp_path: Path) -> None:
    _, masks = series_and_masks(tmp_path / "series", VARIANTS["oblique"])
    rtstruct = pydicom.dcmread(write_rtstruct(masks, LABELS, tmp_path / "series", tmp_path / "rt.dcm", model="f" * 64))
    series = read_series(tmp_path / "series")
    first = next(iter(series.values()))
    assert rtstruct.Modality == "RTSTRUCT" and rtstruct.StudyInstanceUID == first.StudyInstanceUID
    referenced = rtstruct.ReferencedFrameOfReferenceSequence[0]
    assert referenced.FrameOfReferenceUID == first.FrameOfReferenceUID
    images = referenced.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert {str(item.ReferencedSOPInstanceUID) for item in images} == set(series)
    assert [str(roi.ROIName) for roi in rtstruct.StructureSetROISequence] == LABELS
    assert all(
        "AI-generated" in roi.ROIGenerationDescription and "ffffffff" in roi.ROIGenerationDescription
        for roi in rtstruct.StructureSetROISequence
    )
    assert "not for clinical use" in rtstruct.SeriesDescription
    again = pydicom.dcmread(write_rtstruct(masks[::-1], LABELS[::-1], tmp_path / "series", tmp_path / "rt2.dcm"))
    colours = {
        str(roi.ROIName): list(c.ROIDisplayColor)
        for roi, c in zip(rtstruct.StructureSetROISequence, rtstruct.ROIContourSequence, strict=True)
    }
    colours_again = {
        str(roi.ROIName): list(c.ROIDisplayColor)
        for roi, c in zip(again.StructureSetROISequence, again.ROIContourSequence, strict=True)
    }
    assert colours == colours_again, "a structure's colour depends on its name alone"


@pytest.mark.parametrize("name", ["oblique", "sagittal"])
def test_dciodvfy_finds_no_error_in_the_seg_the_rtstruct_or_the_sr(tmp_path: Path, dciodvfy: str, name: str) -> None:
    _, masks = series_and_masks(tmp_path / "series", VARIANTS[name])
    seg = write_dicom_seg(masks, LABELS, tmp_path / "series", tmp_path / "seg.dcm", model="f" * 64)
    statistics = [{"volume_ml": float(mask.sum()), "intensity_mean": 40.0 if mask.any() else None} for mask in masks]
    written = [
        seg,
        write_rtstruct(masks, LABELS, tmp_path / "series", tmp_path / "rt.dcm", model="f" * 64),
        write_measurement_report(pydicom.dcmread(seg), statistics, "ct", tmp_path / "sr.dcm", model="f" * 64),
    ]
    for path in written:
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


@pytest.mark.parametrize("name", ["axial", "rows_flipped", "shuffled_instance_numbers"])
def test_rt_utils_reads_the_same_contours(tmp_path: Path, name: str) -> None:
    """rt-utils (not installed by the suite: it needs OpenCV) reads the same structures, one boundary voxel
    wider: its fill takes every voxel a contour touches, ours (a treatment planning system's) the voxel centres
    inside, so each of its masks holds ours and lies within ours grown by one voxel in the slice plane. A flip,
    shift or slice mix-up fails that. On square slices of square pixels: rt-utils 1.2.7 allocates a slice as
    columns x rows (clipping a non-square one) and scales both pixel axes by one spacing."""
    rt_utils = pytest.importorskip("rt_utils", reason="rt-utils is not installed (it needs OpenCV)")
    volume, masks = series_and_masks(tmp_path / "series", VARIANTS[name], shape=(24, 24, 9), pixel_spacing=(1.2, 1.2))
    write_rtstruct(masks, LABELS, tmp_path / "series", tmp_path / "rt.dcm")
    ours = rtstruct_masks(pydicom.dcmread(tmp_path / "rt.dcm"), read_series(tmp_path / "series"), volume)
    theirs = rt_utils.RTStructBuilder.create_from(str(tmp_path / "series"), str(tmp_path / "rt.dcm"))
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = True
    for label in LABELS[:2]:
        raw = theirs.get_roi_mask_by_name(label)  # [rows, columns, slices] in rt-utils' own slice order
        placed = np.zeros(volume.shape, bool)
        for source, inside in zip(theirs.series_data, np.moveaxis(raw, 2, 0), strict=True):
            rows, columns = np.nonzero(inside)
            world = pixel_world(
                source.ImagePositionPatient, source.ImageOrientationPatient, source.PixelSpacing, rows, columns
            )
            placed |= place(volume, world).astype(bool)
        grown = ndimage.binary_dilation(ours[label].astype(bool), in_plane)
        assert (placed >= ours[label].astype(bool)).all() and not (placed & ~grown).any(), label
