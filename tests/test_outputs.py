"""Outputs on the input grid: NIfTI files, the merged label map, statistics, JSON and the preview."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch

from satseg.atomic import remove_stale_parts
from satseg.engine import LabelMapAccumulator, Outputs, PromptPlan, collect, keep_largest_component
from satseg.errors import SatInputError
from satseg.geometry.volume import Volume
from satseg.outputs import (
    OutputOptions,
    SegmentationResult,
    mask_statistics,
    preview_views,
    read_label_extension,
    save_preview,
    write_json,
    write_nifti,
    write_result,
)
from satseg.outputs.writer import mask_file_name
from satseg.phantom import make_torso_phantom

SHAPE = (12, 10, 8)


def rotation(angle_x: float, angle_z: float) -> np.ndarray:
    """``[3, 3]`` rotation about x then z (radians)."""
    cx, sx, cz, sz = np.cos(angle_x), np.sin(angle_x), np.cos(angle_z), np.sin(angle_z)
    about_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    about_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return about_z @ about_x


def oblique_affine(shear: float = 0.0) -> np.ndarray:
    """A rotated (optionally sheared) affine, rounded to float32 as one read from a NIfTI file is."""
    linear = rotation(0.3, -0.2) @ np.diag([0.8, 0.75, 2.5])
    linear[:, 2] += shear * linear[:, 0]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-123.4567, 45.678, -300.125]
    return affine.astype(np.float32).astype(np.float64)


def engine_result(
    volume: Volume, terms: list[str], maps: list[np.ndarray], threshold: float = 0.5, outputs: Outputs | None = None
) -> SegmentationResult:
    """The engine's threshold, merge and measure on hand-made probability maps, one query row per term."""
    plan = PromptPlan(tuple(terms), (1,) * len(terms), (False,) * len(terms))
    probabilities = (torch.from_numpy(np.asarray(m, np.float32)) for m in maps)
    return collect(volume, plan, probabilities, threshold, volume.shape, outputs or Outputs())


def raw_header(path: Path) -> nib.Nifti1Header:
    """The header as stored (nibabel's loaded image resets scl_slope/scl_inter)."""
    with gzip.open(path, "rb") as file:
        return nib.Nifti1Header.from_fileobj(file)


def no_leftovers(folder: Path, *expected: str) -> bool:
    return sorted(p.name for p in folder.iterdir()) == sorted(expected)


# --- NIfTI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "stored"),
    [
        (np.random.default_rng(0).random(SHAPE) > 0.5, np.uint8),
        (np.random.default_rng(1).integers(0, 2, SHAPE, dtype=np.uint8), np.uint8),
        (np.random.default_rng(2).integers(0, 300, SHAPE, dtype=np.uint16), np.uint16),
    ],
)
def test_write_nifti_stores_data_unscaled_in_its_dtype(tmp_path: Path, array: np.ndarray, stored: type) -> None:
    path = write_nifti(array, oblique_affine(), tmp_path / "mask.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == stored
    assert np.array_equal(np.asarray(image.dataobj), array)
    assert np.asarray(image.dataobj).dtype == stored
    header = raw_header(path)
    assert (float(header["scl_slope"]), float(header["scl_inter"])) == (1.0, 0.0)
    assert no_leftovers(tmp_path, "mask.nii.gz")


def test_oblique_affine_survives_in_sform_and_qform(tmp_path: Path) -> None:
    affine = oblique_affine()
    header = nib.load(write_nifti(np.zeros(SHAPE, np.uint8), affine, tmp_path / "m.nii.gz")).header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (1, 1)
    np.testing.assert_allclose(nib.load(tmp_path / "m.nii.gz").affine, affine, rtol=0, atol=1e-6)
    np.testing.assert_allclose(header.get_sform(), affine, rtol=0, atol=1e-6)
    # A rotation needs no shear, so the quaternion form holds it too (float32 quaternion).
    np.testing.assert_allclose(header.get_qform(), affine, rtol=0, atol=1e-5)


def test_sheared_affine_is_exact_in_the_sform(tmp_path: Path) -> None:
    affine = oblique_affine(shear=0.2)
    path = write_nifti(np.zeros(SHAPE, np.uint8), affine, tmp_path / "m.nii.gz")
    image = nib.load(path)
    np.testing.assert_allclose(image.affine, affine, rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.header.get_sform(), affine, rtol=0, atol=1e-6)
    # The qform cannot hold shear: it keeps the nearest shear-free affine.
    assert not np.allclose(image.header.get_qform(), affine, atol=1e-3)


def test_float64_affine_is_kept_to_float32_precision(tmp_path: Path) -> None:
    affine = oblique_affine()
    affine[:3, 3] += [1e-4 / 3, 2e-4 / 7, 1e-5 / 9]  # not representable in float32
    image = nib.load(write_nifti(np.zeros(SHAPE, np.uint8), affine, tmp_path / "m.nii.gz"))
    np.testing.assert_allclose(image.affine, affine, rtol=0, atol=np.finfo(np.float32).eps * 512)


def test_label_names_round_trip_in_a_comment_extension(tmp_path: Path) -> None:
    labels = {1: "liver", 2: "left kidney", 300: "Wirbelkörper L1"}
    path = write_nifti(np.zeros(SHAPE, np.uint16), np.eye(4), tmp_path / "labels.nii.gz", labels=labels)
    assert read_label_extension(path) == labels
    (extension,) = nib.load(path).header.extensions
    assert extension.get_code() == 6
    content = json.loads(extension.get_content())
    assert content["labels"] == {"1": "liver", "2": "left kidney", "300": "Wirbelkörper L1"}
    assert content["generated_by"] == "satseg"
    assert "not for clinical use" in content["note"]


def test_read_label_extension_ignores_foreign_files(tmp_path: Path) -> None:
    plain = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4))
    nib.save(plain, tmp_path / "plain.nii.gz")
    assert read_label_extension(tmp_path / "plain.nii.gz") == {}
    plain.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"free text, not JSON"))
    plain.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'{"labels": {"1": "x"}}'))
    nib.save(plain, tmp_path / "commented.nii.gz")
    assert read_label_extension(tmp_path / "commented.nii.gz") == {}
    assert read_label_extension(write_nifti(np.zeros(SHAPE, np.uint8), np.eye(4), tmp_path / "m.nii.gz")) == {}


def test_write_nifti_rejects_bad_arguments(tmp_path: Path) -> None:
    mask = np.zeros(SHAPE, np.uint8)
    with pytest.raises(SatInputError):
        write_nifti(mask, np.eye(4), tmp_path / "mask.nii")
    with pytest.raises(TypeError):
        write_nifti(mask.astype(np.float32), np.eye(4), tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="label values"):
        write_nifti(mask, np.eye(4), tmp_path / "m.nii.gz", labels={256: "too big for uint8"})
    with pytest.raises(ValueError, match="affine"):
        write_nifti(mask, np.full((4, 4), np.nan), tmp_path / "m.nii.gz")
    assert no_leftovers(tmp_path)


def test_interrupted_nifti_write_leaves_the_old_file_and_no_partial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_nifti(np.ones(SHAPE, np.uint8), np.eye(4), tmp_path / "mask.nii.gz")
    before = path.read_bytes()

    def interrupted(self: nib.Nifti1Image, stream: gzip.GzipFile) -> None:
        stream.write(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_nifti(np.zeros(SHAPE, np.uint8), np.eye(4), path)
    with pytest.raises(KeyboardInterrupt):
        write_nifti(np.zeros(SHAPE, np.uint8), np.eye(4), tmp_path / "new.nii.gz")
    assert path.read_bytes() == before
    assert no_leftovers(tmp_path, "mask.nii.gz")


# --- label map -------------------------------------------------------------------------------------


def test_overlapping_prompts_resolve_by_highest_probability() -> None:
    first = np.zeros(SHAPE, np.float32)
    second = np.zeros(SHAPE, np.float32)
    first[:6] = 0.9
    first[6:8] = 0.6  # overlap: second is more probable here
    second[6:8] = 0.8
    second[8:10] = 0.55
    first[8:10] = 0.7  # overlap: first is more probable here
    accumulator = LabelMapAccumulator(SHAPE)
    accumulator.add(1, first)
    accumulator.add(2, torch.from_numpy(second))  # torch input is accepted too
    labelmap = accumulator.labelmap
    assert labelmap.dtype == np.uint16 and labelmap.shape == SHAPE
    assert (labelmap[:6] == 1).all() and (labelmap[6:8] == 2).all()
    assert (labelmap[8:10] == 1).all() and (labelmap[10:] == 0).all()


def test_label_map_values_name_only_added_prompts() -> None:
    rng = np.random.default_rng(3)
    accumulator = LabelMapAccumulator(SHAPE, probability_dtype=np.float32)
    for value in (1, 2, 3):
        accumulator.add(value, rng.random(SHAPE), threshold=0.6)
    labelmap = accumulator.labelmap
    assert set(np.unique(labelmap)) <= {0, 1, 2, 3}
    assert {1, 2, 3} <= set(np.unique(labelmap))  # random maps: each wins somewhere


def test_threshold_and_ties() -> None:
    half = np.full(SHAPE, 0.5, np.float32)
    accumulator = LabelMapAccumulator(SHAPE)
    accumulator.add(1, half)  # not above 0.5
    assert not accumulator.labelmap.any()
    accumulator.add(2, half, threshold=0.4)
    accumulator.add(3, half, threshold=0.4)  # a tie keeps the earlier prompt
    assert (accumulator.labelmap == 2).all()


def test_label_map_accumulator_rejects_misuse() -> None:
    accumulator = LabelMapAccumulator(SHAPE)
    accumulator.add(1, np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="new value"):
        accumulator.add(1, np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="new value"):
        accumulator.add(0, np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match="shape"):
        accumulator.add(2, np.zeros((3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="read-only"):
        accumulator.labelmap[0, 0, 0] = 5


# --- statistics and JSON ---------------------------------------------------------------------------


def stats_volume(affine: np.ndarray, dtype: type = np.float32, seed: int = 0) -> Volume:
    """A ``SHAPE`` volume of random intensities (HU-like, any sign) on ``affine``."""
    values = np.random.default_rng(seed).normal(20.0, 300.0, SHAPE)
    return Volume(values.astype(dtype), affine)


def flipped_rotation_affine() -> np.ndarray:
    """i -> +y by 2 mm, j -> -x by 3 mm, k -> -z by 1.5 mm (a 90 degree turn about z and a negative axis):
    world(i, j, k) = (10 - 3 j, -20 + 2 i, 30 - 1.5 k)."""
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, -3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, -1.5]]
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def oblique_flipped_affine() -> np.ndarray:
    """The oblique affine with its j axis reversed (a left-handed, rotated grid)."""
    affine = oblique_affine()
    affine[:3, 1] *= -1.0
    return affine


def irregular_mask(seed: int = 3) -> np.ndarray:
    """``SHAPE`` bool: a scatter of voxels away from the field of view's edges."""
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = np.random.default_rng(seed).random((SHAPE[0] - 4, SHAPE[1] - 4, SHAPE[2] - 4)) < 0.3
    return mask


def test_mask_statistics_in_millilitres() -> None:
    mask = np.zeros(SHAPE, bool)
    mask[:10, :10, :5] = True
    volume = Volume(np.zeros(SHAPE, np.int16), np.diag([0.8, 0.8, 2.0, 1.0]))  # 1.28 mm^3 voxels
    assert {key: mask_statistics(volume, mask)[key] for key in ("voxels", "volume_ml")} == {
        "voxels": 500,
        "volume_ml": 0.64,
    }
    # Rounded to 0.001 mL (1 mm^3).
    tiny = Volume(np.zeros(SHAPE, np.int16), np.diag([0.5, 0.5, 0.5, 1.0]))  # 0.125 mm^3 voxels
    single = np.zeros(SHAPE, bool)
    single[0, 0, :3] = True
    assert mask_statistics(tiny, single)["volume_ml"] == 0.0
    with pytest.raises(ValueError, match="positive"):
        mask_statistics(Volume(np.zeros(SHAPE, np.int16), np.diag([1.0, 1.0, 0.0, 1.0])), mask)
    with pytest.raises(ValueError, match="grid"):
        mask_statistics(volume, mask[:, :, :4])


def test_empty_mask_has_zero_volume_and_null_fields(tmp_path: Path) -> None:
    statistics = mask_statistics(stats_volume(oblique_affine()), np.zeros(SHAPE, np.uint8))
    assert statistics["voxels"] == 0 and statistics["volume_ml"] == 0.0
    others = {key: value for key, value in statistics.items() if key not in ("voxels", "volume_ml")}
    assert len(others) == 8 and all(value is None for value in others.values())
    # JSON null, not NaN (write_json refuses NaN).
    text = write_json({"liver": statistics}, tmp_path / "statistics.json").read_text()
    assert json.loads(text)["liver"]["intensity_mean"] is None and text.count("null") == 8


def test_intensities_are_in_the_images_units_by_hand() -> None:
    """Four CT voxels of 10, 20, 30 and 40 HU: mean 25, std sqrt(125), median 25, p5 11.5, p95 38.5."""
    array = np.full(SHAPE, -1000, np.int16)
    mask = np.zeros(SHAPE, np.uint8)
    for value, index in zip((10, 20, 30, 40), ((1, 1, 1), (5, 2, 3), (7, 7, 6), (3, 8, 2)), strict=True):
        array[index], mask[index] = value, 1
    statistics = mask_statistics(Volume(array, np.eye(4), "ct"), mask)
    assert statistics["intensity_mean"] == 25.0
    assert statistics["intensity_std"] == 11.18  # sqrt(125) = 11.1803
    assert statistics["intensity_median"] == 25.0
    assert (statistics["intensity_p5"], statistics["intensity_p95"]) == (11.5, 38.5)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
@pytest.mark.parametrize("affine", [oblique_affine(), oblique_flipped_affine(), flipped_rotation_affine()])
def test_intensity_statistics_equal_numpys_on_the_masked_values(dtype: type, affine: np.ndarray) -> None:
    volume, mask = stats_volume(affine, dtype), irregular_mask()
    values = volume.array[mask].astype(np.float64)
    expected = {
        "intensity_mean": np.mean(values),
        "intensity_std": np.std(values),
        "intensity_median": np.median(values),
        "intensity_p5": np.percentile(values, 5),
        "intensity_p95": np.percentile(values, 95),
    }
    statistics = mask_statistics(volume, mask.astype(np.uint8))
    assert statistics["voxels"] == int(mask.sum())
    for key, value in expected.items():
        assert statistics[key] == pytest.approx(value, abs=0.005 + 1e-9), key
        assert statistics[key] == round(statistics[key], 2)  # rounded to 0.01


def test_bounding_box_on_a_rotated_and_flipped_grid_by_hand() -> None:
    """Voxels (1, 2, 3), (4, 6, 5) and (2, 3, 4) under world = (10 - 3 j, -20 + 2 i, 30 - 1.5 k): x from
    10 - 18 to 10 - 6, y from -20 + 2 to -20 + 8, z from 30 - 7.5 to 30 - 4.5."""
    mask = np.zeros(SHAPE, bool)
    for index in ((1, 2, 3), (4, 6, 5), (2, 3, 4)):
        mask[index] = True
    statistics = mask_statistics(stats_volume(flipped_rotation_affine()), mask)
    assert statistics["bbox_min_ras_mm"] == [-8.0, -18.0, 22.5]
    assert statistics["bbox_max_ras_mm"] == [4.0, -12.0, 25.5]
    assert statistics["touches_fov_edge"] is False


@pytest.mark.parametrize("affine", [oblique_affine(), oblique_flipped_affine(), oblique_affine(shear=0.2)])
def test_bounding_box_of_a_box_mask_on_oblique_grids(affine: np.ndarray) -> None:
    """A filled index box holds its 8 corners, so the world box is the min/max over every voxel's centre."""
    mask = np.zeros(SHAPE, bool)
    mask[2:9, 1:7, 3:6] = True
    centres = nib.affines.apply_affine(affine, np.argwhere(mask))
    statistics = mask_statistics(stats_volume(affine), mask)
    assert statistics["bbox_min_ras_mm"] == pytest.approx(centres.min(axis=0), abs=0.005 + 1e-9)
    assert statistics["bbox_max_ras_mm"] == pytest.approx(centres.max(axis=0), abs=0.005 + 1e-9)


@pytest.mark.parametrize(
    ("affine", "tight"),
    [(flipped_rotation_affine(), True), (np.diag([-0.7, 1.2, -2.0, 1.0]), True), (oblique_flipped_affine(), False)],
)
def test_bounding_box_of_a_scattered_mask(affine: np.ndarray, tight: bool) -> None:
    """Without obliquity the box is exactly the voxel centres' min/max; on an oblique grid it encloses them."""
    mask = irregular_mask()
    centres = nib.affines.apply_affine(affine, np.argwhere(mask))
    statistics = mask_statistics(stats_volume(affine), mask)
    low, high = np.array(statistics["bbox_min_ras_mm"]), np.array(statistics["bbox_max_ras_mm"])
    assert (low <= centres.min(axis=0) + 0.005).all() and (high >= centres.max(axis=0) - 0.005).all()
    exact = np.allclose(low, centres.min(axis=0), atol=0.006) and np.allclose(high, centres.max(axis=0), atol=0.006)
    assert exact is tight


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("last", [False, True])
def test_touching_the_field_of_views_edge(axis: int, last: bool) -> None:
    mask = np.zeros(SHAPE, bool)
    mask[3:6, 3:6, 3:6] = True
    volume = stats_volume(oblique_affine())
    assert mask_statistics(volume, mask)["touches_fov_edge"] is False
    edge = [4, 4, 4]
    edge[axis] = SHAPE[axis] - 1 if last else 0
    mask[tuple(edge)] = True
    assert mask_statistics(volume, mask)["touches_fov_edge"] is True


def test_mask_statistics_gathers_only_the_structures_voxels() -> None:
    """A 1000-voxel structure in a 4-million-voxel volume: no full-volume copy (a float64 one is 32 MB)."""
    shape = (200, 200, 100)
    volume = Volume(np.zeros(shape, np.int16), np.eye(4))
    mask = np.zeros(shape, np.uint8)
    mask[50:60, 50:60, 40:50] = 1
    tracemalloc.start()
    try:
        statistics = mask_statistics(volume, mask)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert statistics["voxels"] == 1000 and peak < volume.array.nbytes // 8


def test_every_output_choice_measures_the_same_masks(tmp_path: Path) -> None:
    """Masks, a label map or both: one statistics.json, counted from each term's own mask, so overlapping terms
    ("kidney" and "left kidney") each count their shared voxels, whatever the label map gave them."""
    volume, labels, _ = make_torso_phantom((40, 32, 12))
    terms = ["liver", "kidney", "left kidney", "absent"]
    left = labels == 3
    maps = [labels == 1, (left | (labels == 4)) * 0.7, left * 0.9, np.zeros_like(labels, bool)]
    written = []
    for name, outputs in {"masks": Outputs(), "labelmap": Outputs(False, True), "both": Outputs(True, True)}.items():
        result = engine_result(volume, terms, maps, outputs=outputs)
        files = OutputOptions(masks=outputs.masks, merged_labelmap=outputs.labelmap, statistics=True)
        write_result(volume, result, tmp_path / name, files)
        written.append(json.loads((tmp_path / name / "statistics.json").read_text()))
    assert written[0] == written[1] == written[2]
    assert written[0]["left kidney"]["voxels"] == int(left.sum()) > 0  # though the label map gives them away
    assert written[0]["kidney"]["voxels"] == int((left | (labels == 4)).sum())
    liver = volume.array[labels == 1].astype(np.float64)
    assert written[0]["liver"]["voxels"] == liver.size > 0
    assert written[0]["liver"]["intensity_mean"] == pytest.approx(liver.mean(), abs=0.005 + 1e-9)
    assert written[0]["absent"]["intensity_mean"] is None


def test_write_result_refuses_files_the_result_cannot_give(tmp_path: Path) -> None:
    volume, labels, _ = make_torso_phantom((40, 32, 12))
    only_masks = engine_result(volume, ["liver"], [labels == 1])
    with pytest.raises(ValueError, match="label map"):
        write_result(volume, only_masks, tmp_path, OutputOptions(preview=True))
    only_labelmap = engine_result(volume, ["liver"], [labels == 1], outputs=Outputs(False, True))
    with pytest.raises(ValueError, match="masks"):
        write_result(volume, only_labelmap, tmp_path, OutputOptions())


def test_write_json_round_trip_and_atomic(tmp_path: Path) -> None:
    content = {"liver": {"voxels": 3, "volume_ml": 0.004}, "Wirbelkörper": {"voxels": 0, "volume_ml": 0.0}}
    path = write_json(content, tmp_path / "statistics.json")
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == content and text.endswith("\n") and "Wirbelkörper" in text
    with pytest.raises(ValueError):
        write_json({"volume_ml": float("nan")}, path)
    with pytest.raises(TypeError):
        write_json({"volume_ml": object()}, tmp_path / "labels.json")
    assert json.loads(path.read_text(encoding="utf-8")) == content
    assert no_leftovers(tmp_path, "statistics.json")


# --- preview ---------------------------------------------------------------------------------------


def phantom(shape: tuple[int, int, int] = (40, 36, 24)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS-stored ``(image, affine, labelmap)``: a body, label 1 on the patient's right front top."""
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    image = np.where(((x - 20) / 18) ** 2 + ((y - 18) / 15) ** 2 < 1, 40.0, -1000.0) + z
    labelmap = np.zeros(shape, np.uint16)
    labelmap[24:34, 20:30, 12:20] = 1  # high x = right, high y = anterior, high z = superior
    labelmap[10:14, 10:14, 14:16] = 2  # small: the label centroid (28, 24, 15) stays in label 1
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = [-18.0, 20.0, 100.0]
    return image, affine, labelmap


def as_lps(image: np.ndarray, affine: np.ndarray, labelmap: np.ndarray):  # type: ignore[no-untyped-def]
    """The same data stored in LPS voxel order: flip the first two axes, fix the affine."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [image.shape[0] - 1, image.shape[1] - 1]
    return image[::-1, ::-1].copy(), affine @ flip, labelmap[::-1, ::-1].copy()


def as_sagittal_stack(image: np.ndarray, affine: np.ndarray, labelmap: np.ndarray):  # type: ignore[no-untyped-def]
    """The same data stored with axes (S, A, R): a permutation, fix the affine."""
    permute = np.zeros((4, 4))
    permute[0, 2] = permute[1, 1] = permute[2, 0] = permute[3, 3] = 1.0
    return image.transpose(2, 1, 0).copy(), affine @ permute, labelmap.transpose(2, 1, 0).copy()


@pytest.mark.parametrize("restore", [as_lps, as_sagittal_stack])
def test_preview_views_do_not_depend_on_storage_order(restore) -> None:  # type: ignore[no-untyped-def]
    ras = preview_views(*phantom())
    other = preview_views(*restore(*phantom()))
    for a, b in zip(ras, other, strict=True):
        assert (a.name, a.edges) == (b.name, b.edges)
        assert a.aspect == pytest.approx(b.aspect)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)


def test_preview_views_are_radiological() -> None:
    axial, coronal, sagittal = preview_views(*phantom())
    # The centroid of all labels is cut, so label 1 (right, anterior, superior) is visible.
    rows, cols = np.nonzero(axial.labels == 1)
    assert cols.mean() < axial.labels.shape[1] / 2  # patient right on the viewer's left
    assert rows.mean() < axial.labels.shape[0] / 2  # anterior at the top
    rows, cols = np.nonzero(coronal.labels == 1)
    assert cols.mean() < coronal.labels.shape[1] / 2 and rows.mean() < coronal.labels.shape[0] / 2
    rows, cols = np.nonzero(sagittal.labels == 1)
    assert cols.mean() < sagittal.labels.shape[1] / 2 and rows.mean() < sagittal.labels.shape[0] / 2
    # Shapes and pixel aspect: axial is [A-P rows, R-L cols]; spacing (0.9, 1.1, 3.0).
    assert axial.image.shape == (36, 40) and axial.aspect == pytest.approx(1.1 / 0.9)
    assert coronal.image.shape == (24, 40) and coronal.aspect == pytest.approx(3.0 / 0.9)
    assert sagittal.image.shape == (24, 36) and sagittal.aspect == pytest.approx(3.0 / 1.1)
    assert (axial.edges, coronal.edges, sagittal.edges) == (
        ("R", "L", "A", "P"),
        ("R", "L", "S", "I"),
        ("A", "P", "S", "I"),
    )


def test_empty_label_map_cuts_through_the_centre() -> None:
    image, affine, labelmap = phantom()
    axial, coronal, sagittal = preview_views(image, affine, np.zeros_like(labelmap))
    assert np.array_equal(axial.image, np.flip(image[:, :, 12]).T.astype(np.float32))
    assert np.array_equal(coronal.image, np.flip(image[:, 18, :]).T.astype(np.float32))
    assert np.array_equal(sagittal.image, np.flip(image[20, :, :]).T.astype(np.float32))


def test_save_preview_writes_the_same_png_for_lps_input(tmp_path: Path) -> None:
    labels = {1: "liver", 2: "spleen"}
    ras = save_preview(*phantom(), labels, tmp_path / "ras.png", title="phantom")
    image, affine, labelmap = as_lps(*phantom())
    lps = save_preview(image, affine, labelmap, labels, tmp_path / "lps.png", title="phantom")
    assert ras.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < ras.stat().st_size < 2_000_000
    pixels = matplotlib.image.imread(ras)
    assert pixels.shape[:2] == (500, 1200)
    assert np.array_equal(pixels, matplotlib.image.imread(lps))
    assert no_leftovers(tmp_path, "ras.png", "lps.png")


def test_save_preview_needs_a_name_for_every_shown_label(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no name"):
        save_preview(*phantom(), {1: "liver"}, tmp_path / "preview.png")
    assert no_leftovers(tmp_path)


def test_ct_previews_use_the_soft_tissue_window(tmp_path: Path) -> None:
    """A CT's preview is windowed at W400/L40, so soft tissue is mid-grey, not washed out by air."""
    volume, labels, _ = make_torso_phantom((40, 32, 12))
    result = engine_result(volume, ["liver"], [labels == 1], outputs=Outputs(False, True))
    pictures = {}
    for modality in ("ct", None):
        out = tmp_path / str(modality)
        write_result(volume, result, out, OutputOptions(masks=False, preview=True, modality=modality))
        pictures[modality] = (out / "preview.png").read_bytes()
    assert pictures["ct"] != pictures[None]


def test_largest_component_zeroes_only_the_smaller_pieces() -> None:
    probabilities = torch.zeros(12, 10, 8)
    probabilities[1:5, 1:5, 1:5] = 0.9  # the largest piece (64 voxels)
    probabilities[5, 5, 5] = 0.8  # touches it by a corner only: the same piece under 26-connectivity
    probabilities[8:10, 7:9, 5:7] = 0.7  # a separate piece (8 voxels)
    probabilities[11, 0, 0] = 0.4  # below the threshold: not a piece, left as it is
    expected = probabilities.clone()
    expected[8:10, 7:9, 5:7] = 0.0
    result = keep_largest_component(probabilities, 0.5)
    assert result is probabilities  # in place
    assert torch.equal(result, expected)


def test_largest_component_leaves_empty_and_one_piece_masks_alone() -> None:
    empty = torch.full((6, 6, 6), 0.2)
    assert torch.equal(keep_largest_component(empty.clone(), 0.5), empty)
    one = torch.zeros(6, 6, 6)
    one[2:4, 2:4, 2:4] = 0.6
    assert torch.equal(keep_largest_component(one.clone(), 0.5), one)
    # Both pieces are below a higher threshold's mask: nothing changes.
    two = one.clone()
    two[0, 0, 0] = 0.55
    assert torch.equal(keep_largest_component(two.clone(), 0.7), two)


def test_masks_and_label_map_are_cut_at_each_results_own_threshold(tmp_path: Path) -> None:
    """Masks, label map and statistics are all cut at the one threshold the engine is given."""
    volume, labels, _ = make_torso_phantom((40, 32, 12))
    probabilities = np.where(labels == 1, 0.45, 0.05)
    for threshold, inside in ((0.5, False), (0.4, True)):
        result = engine_result(volume, ["liver"], [probabilities], threshold, Outputs(True, True))
        out = tmp_path / str(threshold)
        write_result(volume, result, out, OutputOptions(merged_labelmap=True, statistics=True))
        assert np.array_equal(result.masks[0], (labels == 1) & inside)
        labelmap = np.asarray(nib.load(out / "labelmap.nii.gz").dataobj)
        assert np.array_equal(labelmap == 1, (labels == 1) & inside)
        voxels = json.loads((out / "statistics.json").read_text())["liver"]["voxels"]
        assert voxels == (int((labels == 1).sum()) if inside else 0)


def test_label_map_membership_is_the_masks_threshold_on_the_same_values() -> None:
    """Label maps were thresholded on float16 copies, masks on float32: 0.50001 was in the mask (> 0.5) and
    background in the label map (float16 rounds it to 0.5), so a liver counted 37,282 voxels one way and
    37,269 the other."""
    probabilities = torch.tensor([0.50001, 0.5, 0.49, 0.9, 0.50001], dtype=torch.float32).reshape(1, 1, 5)
    overlapping = torch.tensor([0.6, 0.7, 0.2, 0.50002, 0.1], dtype=torch.float32).reshape(1, 1, 5)
    merged = LabelMapAccumulator((1, 1, 5))
    merged.add(1, probabilities, 0.5)
    merged.add(2, overlapping, 0.5)
    inside = [(p > 0.5).numpy() for p in (probabilities, overlapping)]
    assert np.array_equal(merged.labelmap > 0, inside[0] | inside[1])
    assert merged.labelmap.reshape(-1).tolist() == [2, 2, 0, 1, 1]


def test_stale_parts_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """SIGKILL during an atomic write leaves ``.<name>.<hex>.part``; the next run removes it, and only it."""
    (tmp_path / ".run_report.json.0123abcd.part").write_text("{")
    (tmp_path / ".other.json.0123abcd.part").write_text("{")
    (tmp_path / "run_report.json").write_text("{}")
    remove_stale_parts(tmp_path / "run_report.json")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".other.json.0123abcd.part", "run_report.json"]


def test_mask_file_names_are_bounded_unique_and_stable() -> None:
    assert mask_file_name("left kidney") == "left_kidney.nii.gz"
    long_terms = ["x" * 973, "x" * 972, "é" * 300, "liver (" + "y" * 200 + ")"]
    similar = ["left kidney", "Left Kidney", "left-kidney", "left  kidney", "!!!"]
    names = [mask_file_name(term) for term in long_terms + similar]
    assert len(set(names)) == len(names)
    assert all(len(name.encode()) <= 80 and re.fullmatch(r"[a-z0-9_]+\.nii\.gz", name) for name in names)
    assert names == [mask_file_name(term) for term in long_terms + similar]
