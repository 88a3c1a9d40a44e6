"""Evaluation: Dice and NSD on hand-made masks, second geometries, prompts, and a run through the serving path."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.phantom import centred_affine, class_names, make_torso_phantom
from satseg.text import Vocabulary
from satseg_training.data.mni152 import main as mni152_main
from satseg_training.evaluate import main
from satseg_training.evaluation.cases import case_from_files, check_geometry, mni152_case, regrid
from satseg_training.evaluation.metrics import dice_score, surface_dice
from satseg_training.evaluation.prompts import Prompt, parse_prompts

PHANTOM_NAMES = class_names()


def cube(shift: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    mask = np.zeros((40, 40, 40), dtype=bool)
    x, y, z = shift
    mask[10 + x : 30 + x, 10 + y : 30 + y, 10 + z : 30 + z] = True
    return mask


def test_identical_masks_score_one_and_disjoint_masks_zero() -> None:
    assert dice_score(cube(), cube()) == 1.0
    assert surface_dice(cube(), cube(), (1.0, 1.0, 1.0)) == 1.0
    far = np.zeros_like(cube())
    far[33:38, 33:38, 33:38] = True
    assert dice_score(far, cube()) == 0.0
    assert surface_dice(far, cube(), (1.0, 1.0, 1.0)) == 0.0
    empty = np.zeros_like(cube())
    assert dice_score(empty, empty) == 1.0 and surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert dice_score(empty, cube()) == 0.0 and surface_dice(cube(), empty, (1, 1, 1)) == 0.0


def test_a_one_voxel_shift_keeps_nsd_but_costs_dice() -> None:
    shifted = cube((1, 0, 0))
    assert dice_score(shifted, cube()) == pytest.approx(19 / 20)
    assert surface_dice(shifted, cube(), (1.0, 1.0, 1.0), tolerance_mm=2.0) == pytest.approx(1.0)
    assert surface_dice(shifted, cube(), (1.0, 1.0, 1.0), tolerance_mm=0.5) < 0.9


def test_nsd_respects_anisotropic_spacing() -> None:
    """One voxel along a 3 mm axis is beyond a 2 mm tolerance; along a 1 mm axis it is within it."""
    along_thick = cube((0, 0, 1))
    along_thin = cube((1, 0, 0))
    spacing = (1.0, 1.0, 3.0)
    assert surface_dice(along_thin, cube(), spacing, tolerance_mm=2.0) == pytest.approx(1.0)
    thick = surface_dice(along_thick, cube(), spacing, tolerance_mm=2.0)
    assert 0.5 < thick < 0.95
    assert surface_dice(along_thick, cube(), spacing, tolerance_mm=3.0) == pytest.approx(1.0)


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


@pytest.mark.parametrize("geometry", ["lps", "asr", "oblique15"])
def test_second_geometries_keep_world_positions(geometry: str) -> None:
    shape = (48, 40, 16)
    volume, labels, _ = make_torso_phantom(shape, centred_affine(shape, (2.5, 2.5, 5.0), 8.0))
    moved, moved_labels = regrid(volume, labels, geometry)
    assert moved_labels.shape == moved.shape and moved.array.dtype.kind in "if"
    for value in (1, 4):
        before, after = labels == value, moved_labels == value
        assert np.linalg.norm(world_centroid(before, volume.affine) - world_centroid(after, moved.affine)) < 1.5
        volume_ratio = after.sum() * moved.voxel_volume_ml / (before.sum() * volume.voxel_volume_ml)
        assert volume_ratio == pytest.approx(1.0, abs=0.05)
    assert sorted(moved.spacing) == pytest.approx(sorted(volume.spacing))
    if geometry != "oblique15":  # a reorientation is exact: the same voxels, permuted
        assert sorted(np.unique(moved_labels, return_counts=True)[1]) == sorted(
            np.unique(labels, return_counts=True)[1]
        )


def test_geometry_names_and_prompts_are_checked() -> None:
    assert check_geometry(" LPS ") == "lps" and check_geometry("oblique7.5") == "oblique7.5"
    for bad in ("xyz", "llp", "obliqueish"):
        with pytest.raises(SatInputError, match="geometry"):
            check_geometry(bad)
    vocabulary = Vocabulary.load()
    prompts = parse_prompts("Liver, kidneys, left kidney=kidney_left+right kidney", vocabulary)
    assert prompts[0] == Prompt("liver", ("liver",))
    assert prompts[1].term == "kidney" and {"left kidney", "right kidney"} <= set(prompts[1].truth)
    assert prompts[2] == Prompt("left kidney", ("left kidney", "right kidney"))
    with pytest.raises(SatInputError, match="unknown prompt"):
        parse_prompts("livr", vocabulary)
    assert parse_prompts("some blob", vocabulary, allow_free_text=True) == [Prompt("some blob", ("some blob",))]


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A small oblique phantom CT around the kidneys and spine: image, label map and names JSON."""
    folder = tmp_path_factory.mktemp("phantom")
    shape = (40, 32, 10)
    affine = centred_affine(shape, (2.5, 2.5, 5.0), 6.0)
    affine[:3, 3] += (0.0, -40.0, -20.0)
    volume, labels, _ = make_torso_phantom(shape, affine)
    nib.save(nib.Nifti1Image(volume.array, affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "seg.nii.gz")
    (folder / "names.json").write_text(json.dumps(PHANTOM_NAMES))
    return folder / "ct.nii.gz", folder / "seg.nii.gz", folder / "names.json"


def test_cases_take_names_from_json_or_a_mapping(phantom_case: tuple[Path, Path, Path]) -> None:
    image, labels, names = phantom_case
    vocabulary = Vocabulary.load()
    from_json = case_from_files(image, labels, names, "ct", vocabulary)
    from_mapping = case_from_files(image, labels, {4: "kidney_right", 5: "kidney_left"}, "CT", vocabulary)
    assert from_json.classes[4] == "right kidney" and from_json.classes[6] == "spinal cord"
    assert from_mapping.classes == {4: "right kidney", 5: "left kidney"} and from_mapping.modality == "ct"
    assert isinstance(from_json.volume, Volume) and from_json.labels.shape == from_json.volume.shape


def test_mni152_case_is_nilearns_template_with_tissue_labels() -> None:
    pytest.importorskip("nilearn", reason="nilearn (the train extra) ships the MNI152 template")
    case = mni152_case()
    assert case.modality == "mri" and case.labels.shape == case.volume.shape == (197, 233, 189)
    assert set(case.classes.values()) == {
        f"{side} cerebral {tissue}" for side in ("left", "right") for tissue in ("white matter", "cortex")
    }
    by_term = {
        term: np.isin(case.labels, [v for v, t in case.classes.items() if t == term]) for term in case.classes.values()
    }
    white = np.count_nonzero(by_term["left cerebral white matter"] | by_term["right cerebral white matter"])
    grey = np.count_nonzero(by_term["left cerebral cortex"] | by_term["right cerebral cortex"])
    assert 400_000 < white < 1_000_000 and grey > white  # mL at 1 mm: an adult brain's tissue volumes
    x_mm = (case.volume.affine @ np.array([*np.argwhere(by_term["left cerebral cortex"]).mean(axis=0), 1.0]))[0]
    assert x_mm < -20  # the left hemisphere's grey matter lies at MNI x < 0, well off the midline
    left, right = (np.count_nonzero(by_term[f"{side} cerebral white matter"]) for side in ("left", "right"))
    assert abs(left - right) < 0.05 * white  # the template is nearly symmetric
    brain = case.volume.array > 0
    assert np.count_nonzero(case.labels[~brain]) < 0.05 * np.count_nonzero(case.labels)  # tissue lies in the brain
    assert case.volume.affine[0, 0] > 0 and case.volume.affine[1, 1] > 0  # RAS, as nilearn stores it


def test_sat_mni152_writes_the_template_and_its_tissue_labels(tmp_path: Path) -> None:
    pytest.importorskip("nilearn", reason="nilearn (the train extra) ships the MNI152 template")
    image, labels, names = tmp_path / "t1.nii.gz", tmp_path / "tissues.nii.gz", tmp_path / "tissues.json"
    assert mni152_main(["-o", str(image), "--labels", str(labels), "--names", str(names)]) == 0
    case = case_from_files(image, labels, names, "mri", Vocabulary.load())
    reference = mni152_case()
    np.testing.assert_array_equal(case.labels > 0, reference.labels > 0)  # the same tissue, not split in halves
    np.testing.assert_array_equal(case.labels == 1, np.isin(reference.labels, (1, 3)))  # white matter
    np.testing.assert_allclose(case.volume.affine, reference.volume.affine)
    assert case.classes == {1: "cerebral white matter", 2: "cerebral cortex"}


def test_evaluation_runs_through_the_serving_path(
    tiny_checkpoint: Path, phantom_case: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    image, labels, names = phantom_case
    output = tmp_path / "evaluation"
    arguments = ["--checkpoint", str(tiny_checkpoint), "--output", str(output), "--device", "cpu"]
    arguments += ["--case", str(image), str(labels), str(names), "ct", "--geometry", "lps", "oblique15"]
    arguments += ["--prompts", "right kidney,kidney,spinal cord"]
    assert main(arguments) == 0
    document = json.loads((output / "evaluation.json").read_text())
    rows = document["structures"]
    assert {(row["geometry"], row["structure"]) for row in rows} == {
        (geometry, structure)
        for geometry in ("input", "lps", "oblique15")
        for structure in ("right kidney", "kidney", "spinal cord")
    }
    assert all(0.0 <= row["dice"] <= 1.0 and 0.0 <= row["nsd"] <= 1.0 for row in rows)
    kidney = next(row for row in rows if row["structure"] == "kidney" and row["geometry"] == "input")
    right = next(row for row in rows if row["structure"] == "right kidney" and row["geometry"] == "input")
    assert kidney["truth_voxels"] > right["truth_voxels"] > 0  # the parent's truth is the union of both sides
    regions = {(item["geometry"], item["region"]) for item in document["regions"]}
    assert {("input", "abdomen"), ("input", "spine"), ("input", "all")} <= regions
    assert set(document["grid_dependence"]) == {"lps", "oblique15"}
    report = (output / "evaluation.md").read_text()
    assert "## Per region" in report and "| right kidney |" in report and "NSD@2mm" in report


def test_a_baseline_is_scored_on_the_same_cases_and_a_mask_file_is_a_case(
    tiny_checkpoint: Path, phantom_case: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """``--baseline`` scores a second model on the same prompts and grids; ``--mask-case`` reads one
    TotalSegmentator-style mask; prompts are told apart by how many labelled terms their truth joins."""
    image, labels, names = phantom_case
    label_image = nib.load(labels)
    masks = tmp_path / "masks"
    masks.mkdir()
    right = next(int(value) for value, name in PHANTOM_NAMES.items() if name == "kidney_right")
    kidney = (np.asarray(label_image.dataobj) == right).astype(np.uint8)
    nib.save(nib.Nifti1Image(kidney, label_image.affine), masks / "kidney_right.nii.gz")
    output = tmp_path / "compared"
    arguments = ["--checkpoint", str(tiny_checkpoint), "--baseline", str(tiny_checkpoint), "--output", str(output)]
    arguments += ["--device", "cpu", "--case", str(image), str(labels), str(names), "ct"]
    arguments += ["--mask-case", str(image), str(masks / "kidney_right.nii.gz"), "ct"]
    arguments += ["--prompts", "labelled,kidney"]  # each case's labelled terms, and the parent
    assert main(arguments) == 0
    document = json.loads((output / "evaluation.json").read_text())
    rows = document["structures"]
    assert {(row["model"], row["case"]) for row in rows} == {
        (model, case) for model in ("candidate", "baseline") for case in ("ct", "masks")
    }
    by_key = {(row["model"], row["case"], row["structure"]): row for row in rows}
    for key, row in by_key.items():
        twin = by_key[("baseline", *key[1:])]
        assert row["dice"] == twin["dice"] and row["truth_voxels"] == twin["truth_voxels"]  # one model, twice
    assert {row["structure"] for row in rows if row["case"] == "masks"} == {"right kidney", "kidney"}
    assert {"liver", "left kidney", "right kidney", "kidney"} <= {row["structure"] for row in rows}
    from_file = by_key[("candidate", "masks", "right kidney")]
    assert from_file["truth_voxels"] == int(kidney.sum()) > 0
    assert by_key[("candidate", "masks", "kidney")]["kind"] == "single label"  # only the right one is labelled
    assert by_key[("candidate", "ct", "kidney")]["kind"] == "union of labels"
    kinds = {(item["model"], item["kind"]) for item in document["kinds"]}
    assert {("candidate", "union of labels"), ("baseline", "single label"), ("candidate", "all")} <= kinds
    means = {(item["geometry"], item["structure"]): item for item in document["structure_means"]}
    assert means[("input", "right kidney")]["cases"] == 2
    report = (output / "evaluation.md").read_text()
    assert "| baseline Dice |" in report and "| +0.000 |" in report
