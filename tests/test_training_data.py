"""Training data: source readers, label-name mapping, the standardised form end to end, and SynthSeg synthesis.

Everything runs on tiny synthetic volumes written in tmp_path, several on oblique, flipped grids, so a
misplaced label map shows up as a moved organ in world millimetres.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from satseg.engine.preprocess import prepare
from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.phantom import centred_affine, class_names, make_torso_phantom, world_coordinates
from satseg.spec import PreprocessConfig
from satseg.text import Vocabulary
from satseg_training.data.names import map_label_names
from satseg_training.data.readers import (
    CaseSource,
    labelmap_case,
    manifest_cases,
    mask_folder_case,
    modality_from_name,
    nnunet_cases,
    synthseg_cases,
)
from satseg_training.data.standardise import main as standardise_main
from satseg_training.data.standardise import standardise
from satseg_training.data.standardised import StandardisedDataset
from satseg_training.data.synthseg import synthesize_image, t1_mean_ranges

SHAPE = (40, 32, 12)
# Rotated 20 degrees about z and x, and the second axis flipped.
OBLIQUE = centred_affine(SHAPE, (4.0, -4.0, 8.0), 20.0)
AXIAL = centred_affine(SHAPE, (4.0, 4.0, 8.0))
PHANTOM_NAMES = class_names()
PHANTOM_TERMS = {
    "1": "liver",
    "2": "spleen",
    "3": "stomach",
    "4": "right kidney",
    "5": "left kidney",
    "6": "spinal cord",
}
MANIFEST_KEYS = [
    "case",
    "dataset",
    "modality",
    "image",
    "labels",
    "classes",
    "unmapped",
    "extra_labels",
    "synthetic",
    "shape",
    "affine",
]


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _write_json(document: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def _phantom_files(folder: Path, affine: np.ndarray, seed: int = 0) -> tuple[Path, Path, Path]:
    """A CT phantom, its label map (values 1..6, snake_case names) and the names JSON."""
    volume, labels, _ = make_torso_phantom(SHAPE, affine, seed=seed)
    image = _save(volume.array, affine, folder / "ct.nii.gz")
    label_map = _save(labels, affine, folder / "seg.nii.gz")
    return image, label_map, _write_json(PHANTOM_NAMES, folder / "classes.json")


def _nnunet_dataset(folder: Path, cases: dict[str, np.ndarray], *, version: int = 2) -> Path:
    """An nnU-Net raw dataset of phantoms, one per case, on the given affines."""
    labels = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 5}
    document: dict[str, object] = {"file_ending": ".nii.gz", "numTraining": len(cases)}
    if version == 2:
        document |= {"channel_names": {"0": "CT"}, "labels": labels}
    else:
        document |= {"modality": {"0": "CT"}, "labels": {str(v): name for name, v in labels.items()}}
    _write_json(document, folder / "dataset.json")
    for seed, (case, affine) in enumerate(cases.items()):
        volume, phantom_labels, _ = make_torso_phantom(SHAPE, affine, seed=seed)
        _save(volume.array, affine, folder / "imagesTr" / f"{case}_0000.nii.gz")
        _save(phantom_labels, affine, folder / "labelsTr" / f"{case}.nii.gz")
    return folder


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return world_coordinates(mask.shape, affine)[mask].mean(axis=0)


# --- readers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 1])
def test_nnunet_reader(tmp_path: Path, version: int) -> None:
    folder = _nnunet_dataset(tmp_path / "Dataset001_Phantom", {"p1": OBLIQUE, "p2": AXIAL}, version=version)
    sources = nnunet_cases(folder)
    assert [s.key for s in sources] == ["Dataset001_Phantom/p1", "Dataset001_Phantom/p2"]
    case = sources[0].load()
    assert case.modality == "ct" and case.dataset == "Dataset001_Phantom" and case.case_id == "p1"
    assert case.classes == {1: "liver", 2: "spleen", 5: "kidney_left"}
    assert case.labels.dtype == np.uint16 and case.labels.shape == case.image.shape == SHAPE
    np.testing.assert_allclose(case.affine, OBLIQUE, atol=1e-4)
    assert nnunet_cases(folder, modality="mri")[0].modality == "mri"


def test_nnunet_reader_refuses_unusable_datasets(tmp_path: Path) -> None:
    with pytest.raises(SatInputError, match="no such file"):
        nnunet_cases(tmp_path)
    _write_json(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": [1, 2]}}, tmp_path / "dataset.json"
    )
    with pytest.raises(SatInputError, match="region-based"):
        nnunet_cases(tmp_path)
    _write_json({"channel_names": {"0": "XRAY"}, "labels": {"background": 0, "a": 1}}, tmp_path / "dataset.json")
    with pytest.raises(SatInputError, match='unknown modality "XRAY"'):
        nnunet_cases(tmp_path)


def test_labelmap_reader_accepts_whole_float_labels_and_checks_the_grid(tmp_path: Path) -> None:
    image, labels, names = _phantom_files(tmp_path, OBLIQUE)
    case = labelmap_case(image, labels, names, modality="CT", dataset="phantoms").load()
    assert case.case_id == "ct" and case.modality == "ct"
    assert case.classes == {int(value): name for value, name in PHANTOM_NAMES.items()}
    as_float = _save(nib.load(labels).get_fdata().astype(np.float32), OBLIQUE, tmp_path / "float.nii.gz")
    float_case = labelmap_case(image, as_float, names, modality="ct", dataset="phantoms").load()
    np.testing.assert_array_equal(float_case.labels, case.labels)

    fractional = _save(np.full(SHAPE, 0.5, np.float32), OBLIQUE, tmp_path / "fractional.nii.gz")
    moved = OBLIQUE.copy()
    moved[0, 3] += 0.01
    off_grid = {
        "non-integer": fractional,
        "shape 40x32x11": _save(np.zeros((40, 32, 11), np.uint8), OBLIQUE, tmp_path / "short.nii.gz"),
        "affine differing": _save(np.zeros(SHAPE, np.uint8), moved, tmp_path / "moved.nii.gz"),
    }
    for message, path in off_grid.items():
        with pytest.raises(SatInputError, match=message):
            labelmap_case(image, path, names, modality="ct", dataset="phantoms").load()
    with pytest.raises(SatInputError, match="not a label value and name"):
        labelmap_case(image, labels, _write_json({"one": "liver"}, tmp_path / "bad.json"), modality="ct", dataset="d")


def test_mask_folder_merges_masks_later_file_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "case_7"
    image = _save(np.zeros(SHAPE, np.int16), OBLIQUE, folder / "ct.nii.gz")  # the image may sit among the masks
    first = np.zeros(SHAPE, np.uint8)
    first[5:15, 5:15, 2:6] = 1
    second = np.zeros(SHAPE, np.uint8)
    second[10:20, 10:20, 4:8] = 255  # any value above 0 is inside
    _save(first, OBLIQUE, folder / "aorta.nii.gz")
    _save(second, OBLIQUE, folder / "kidney_left.nii.gz")
    with caplog.at_level(logging.WARNING):
        case = mask_folder_case(image, folder, modality="ct", dataset="masks").load()
    assert case.case_id == "case_7" and case.classes == {1: "aorta", 2: "kidney_left"}
    assert "kidney_left.nii.gz overlaps earlier masks in 50 voxels; the later mask wins" in caplog.text
    assert case.labels[12, 12, 5] == 2 and case.labels[6, 6, 3] == 1 and case.labels[0, 0, 0] == 0
    assert np.count_nonzero(case.labels == 1) == first.sum() - 50

    _save(np.zeros((40, 32, 11), np.uint8), OBLIQUE, folder / "zz_off_grid.nii.gz")
    with pytest.raises(SatInputError, match=r"mask 'zz_off_grid\.nii\.gz' have shape"):
        mask_folder_case(image, folder, modality="ct", dataset="masks").load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SatInputError, match="holds no"):
        mask_folder_case(image, tmp_path / "empty", modality="ct", dataset="masks")


def test_manifest_reader_resolves_relative_paths(tmp_path: Path) -> None:
    _, labels, _ = _phantom_files(tmp_path / "data", OBLIQUE)
    mask = _save((nib.load(labels).get_fdata() == 1).astype(np.uint8), OBLIQUE, tmp_path / "data" / "liver.nii.gz")
    lines = [
        {"image": "data/ct.nii.gz", "label": ["data/liver.nii.gz"], "modality": "CT", "case": "masks"},
        {"image": "data/ct.nii.gz", "label": "data/seg.nii.gz", "modality": "ct", "classes": "data/classes.json"},
        {
            "image": "data/ct.nii.gz",
            "label": "data/seg.nii.gz",
            "modality": "T1",
            "classes": {"1": "liver"},
            "dataset": "other",
            "case": "inline",
        },
    ]
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    sources = manifest_cases(manifest)
    assert [s.key for s in sources] == ["cases/masks", "cases/ct", "other/inline"]
    assert [s.modality for s in sources] == ["ct", "ct", "mri"]
    assert sources[0].classes == {1: "liver"} and sources[1].classes[5] == "kidney_left"
    masks_case = sources[0].load()
    np.testing.assert_array_equal(masks_case.labels, nib.load(mask).get_fdata())
    assert sources[2].load().image.shape == SHAPE

    manifest.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"image": "x.nii.gz", "label": "y.nii.gz"}) + "\n")
    with pytest.raises(SatInputError, match='line 2: no "modality"'):
        manifest_cases(manifest)
    manifest.write_text(json.dumps({"image": "x", "label": "y.nii.gz", "modality": "ct"}) + "\n")
    with pytest.raises(SatInputError, match='needs "classes"'):
        manifest_cases(manifest)


def test_synthseg_reader_keeps_unnamed_values_out_of_classes(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, np.float32)  # SynthSeg stores its maps as float
    labels[10:20, 10:20, 3:8] = 17
    labels[20:30, 10:20, 3:8] = 502  # an extra-cerebral tissue: no name
    _save(labels, OBLIQUE, tmp_path / "synth" / "training_seg_01.nii.gz")
    _write_json({"17": "left hippocampus"}, tmp_path / "synth" / "labels.json")
    (source,) = synthseg_cases(tmp_path / "synth")
    case = source.load()
    assert case.image is None and case.modality == "mri" and case.dataset == "synth"
    assert case.classes == {17: "left hippocampus"}
    assert set(np.unique(case.labels).tolist()) == {0, 17, 502}
    np.testing.assert_allclose(case.affine, OBLIQUE, atol=1e-4)


def test_modality_names() -> None:
    assert [modality_from_name(n) for n in ["CT", "MRI", "T2", "t1w", "FLAIR", "ADC", "PET", "us"]] == [
        "ct",
        "mri",
        "mri",
        "mri",
        "mri",
        "mri",
        "pet",
        "us",
    ]
    with pytest.raises(SatInputError, match="unknown modality"):
        modality_from_name("xray")


# --- names -----------------------------------------------------------------------------------------------


def test_unmapped_names_are_returned_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    classes = {
        1: "kidney_left",
        2: "Hippocampus_L",
        3: "Left-Cerebral-White-Matter",
        4: "aorta_false_lumen",
        5: "brain-stem",
    }
    with caplog.at_level(logging.WARNING):
        mapped, unmapped = map_label_names(classes, Vocabulary.load(), source="dataset demo")
    assert mapped == {1: "left kidney", 2: "left hippocampus", 3: "left cerebral white matter", 5: "brainstem"}
    assert unmapped == {4: "aorta_false_lumen"}
    assert "dataset demo: 1 label name(s) not in the vocabulary" in caplog.text and "aorta_false_lumen" in caplog.text


# --- standardise end to end ------------------------------------------------------------------------------


@pytest.fixture
def two_sources(tmp_path: Path) -> list[str]:
    """CLI arguments for an oblique, flipped label-map case and an axis-aligned two-case nnU-Net dataset."""
    image, labels, names = _phantom_files(tmp_path / "oblique", OBLIQUE, seed=3)
    nnunet = _nnunet_dataset(tmp_path / "Dataset002_Axial", {"a1": AXIAL, "a2": AXIAL})
    labelmap = ["--labelmap", str(image), str(labels), str(names), "--modality", "ct", "--dataset", "phantoms"]
    return [*labelmap, "--nnunet", str(nnunet)]


def _run(capsys: pytest.CaptureFixture[str], root: Path, *arguments: str) -> tuple[int, str]:
    code = standardise_main(["-o", str(root), "--no-progress", *arguments])
    return code, capsys.readouterr().out


def _manifest(root: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_standardise_end_to_end(tmp_path: Path, two_sources: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "out"
    code, out = _run(capsys, root, *two_sources)
    assert code == 0, out
    assert "3 of 3 cases standardised" in out and "(3 written, 0 already done, 0 failed)" in out
    lines = _manifest(root)
    assert [line["case"] for line in lines] == ["Dataset002_Axial/a1", "Dataset002_Axial/a2", "phantoms/ct"]
    oblique = lines[2]
    assert list(oblique) == MANIFEST_KEYS
    assert oblique["image"] == "images/phantoms/ct.nii.gz" and oblique["labels"] == "labels/phantoms/ct.nii.gz"
    assert oblique["modality"] == "ct" and oblique["synthetic"] is None and oblique["unmapped"] == {}
    assert oblique["extra_labels"] == []
    assert oblique["classes"] == PHANTOM_TERMS
    assert lines[0]["classes"] == {"1": "liver", "2": "spleen", "5": "left kidney"}
    assert lines[0]["extra_labels"] == [3, 4, 6]  # in the phantom maps, not named by dataset.json
    assert json.loads((root / "unmapped.json").read_text()) == {}

    dataset = StandardisedDataset(root)
    assert len(dataset) == 3 and dataset.cases[2].case == "phantoms/ct"
    image, labels, entry = dataset.load(2)
    assert image.dtype == np.float32 and labels.dtype == np.uint16 and image.shape == labels.shape == entry.shape
    assert abs(float(image.mean())) < 0.05 and abs(float(image.std()) - 1.0) < 0.05  # z-scored
    image_file, labels_file = nib.load(root / oblique["image"]), nib.load(root / oblique["labels"])
    np.testing.assert_allclose(image_file.affine, labels_file.affine)
    np.testing.assert_allclose(image_file.affine, entry.affine, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(entry.affine[:3, :3], axis=0), [1.0, 1.0, 3.0])
    assert nib.aff2axcodes(entry.affine) == ("R", "A", "S")
    # The liver sits where it was in world millimetres (within one model voxel), and images align with labels.
    _, source_labels, _ = make_torso_phantom(SHAPE, OBLIQUE, seed=3)
    liver_value = next(int(value) for value, term in entry.classes.items() if term == "liver")
    error = _centroid_mm(labels == liver_value, entry.affine) - _centroid_mm(source_labels == 1, OBLIQUE)
    assert np.linalg.norm(error) < 1.0
    assert image[labels == liver_value].mean() > image[labels == 0].mean() + 0.5  # 60 HU liver, 40 HU tissue


def test_standardise_resumes_and_rebuilds_what_is_missing(
    tmp_path: Path, two_sources: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "out"
    assert _run(capsys, root, *two_sources)[0] == 0
    written = {path: path.stat().st_mtime_ns for path in root.rglob("*.nii.gz")}
    assert len(written) == 6

    code, out = _run(capsys, root, *two_sources)
    assert code == 0 and "(0 written, 3 already done, 0 failed)" in out
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*.nii.gz")} == written

    (root / "labels" / "Dataset002_Axial" / "a2.nii.gz").unlink()
    with (root / "manifest.jsonl").open("a") as manifest:
        manifest.write('{"case": "cut short by an interrupt')  # no newline: an interrupted append
    code, out = _run(capsys, root, *two_sources)
    assert code == 0 and "(1 written, 2 already done, 0 failed)" in out
    cases = [line["case"] for line in _manifest(root)]
    assert sorted(cases) == ["Dataset002_Axial/a1", "Dataset002_Axial/a2", "phantoms/ct"]  # rebuilt once
    rebuilt = {path for path, mtime in written.items() if path.stat().st_mtime_ns != mtime}
    assert {path.name for path in rebuilt} == {"a2.nii.gz"}  # the image and the labels of a2, nothing else


def test_one_corrupt_case_does_not_stop_the_run(
    tmp_path: Path, two_sources: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    label_file = tmp_path / "Dataset002_Axial" / "labelsTr" / "a1.nii.gz"
    label_file.write_bytes(label_file.read_bytes()[:200])  # truncated
    root = tmp_path / "out"
    code, out = _run(capsys, root, *two_sources)
    assert code == 1
    assert "(2 written, 0 already done, 1 failed)" in out
    assert "Dataset002_Axial/a1: could not read NIfTI 'a1.nii.gz'" in out
    assert [line["case"] for line in _manifest(root)] == ["Dataset002_Axial/a2", "phantoms/ct"]


def test_label_only_maps_go_on_the_model_grid(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, np.uint16)
    labels[8:30, 6:26, 2:10] = 502
    labels[12:24, 10:20, 4:8] = 17
    _save(labels, OBLIQUE, tmp_path / "synth" / "training_seg_03.nii.gz")
    _write_json({"17": "left hippocampus", "99": "not_a_structure"}, tmp_path / "synth" / "labels.json")
    result = standardise(synthseg_cases(tmp_path / "synth"), tmp_path / "out", progress=False)
    assert result.written == ["synth/training_seg_03"] and result.unmapped == {"synth": ["not_a_structure"]}
    (entry,) = StandardisedDataset(tmp_path / "out").cases
    assert entry.image is None and entry.synthetic == "synthseg" and entry.modality == "mri"
    assert entry.classes == {17: "left hippocampus"} and entry.unmapped == {} and entry.extra_labels == (502,)
    image, grid_labels, _ = StandardisedDataset(tmp_path / "out").load(0)
    assert image is None and set(np.unique(grid_labels).tolist()) == {0, 17, 502}
    whole = prepare(Volume(labels, OBLIQUE), "mri", PreprocessConfig(crop_foreground=False)).image.shape
    assert grid_labels.size < 0.7 * np.prod(whole)  # cropped to the labelled region, not the field of view
    synthetic = synthesize_image(grid_labels, np.random.default_rng(0))
    assert synthetic.shape == grid_labels.shape


def test_standardise_refuses_bad_command_lines(
    tmp_path: Path, two_sources: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert standardise_main(["-o", str(tmp_path / "out")]) == 2
    assert "sat-standardise: error: no sources given" in capsys.readouterr().err
    assert standardise_main(["-o", str(tmp_path / "out"), *two_sources[:4]]) == 2
    assert "need --modality" in capsys.readouterr().err
    assert standardise_main(["-o", str(tmp_path / "out"), "--no-progress", *two_sources, *two_sources[-2:]]) == 2
    assert "case Dataset002_Axial/a1 is given twice" in capsys.readouterr().err
    odd = CaseSource("my data", "c", "ct", {}, lambda: pytest.fail("an unusable name must fail before reading"))
    assert standardise([odd], tmp_path / "out", progress=False).failed == {
        "my data/c": "dataset name 'my data' is not usable as a file name; use letters, digits, '.', '_' and '-'"
    }


def test_standardised_dataset_reports_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SatInputError, match="cannot read"):
        StandardisedDataset(tmp_path)
    root = tmp_path / "out"
    image, labels, names = _phantom_files(tmp_path, AXIAL)
    standardise([labelmap_case(image, labels, names, modality="ct", dataset="d")], root, progress=False)
    (root / "images" / "d" / "ct.nii.gz").unlink()
    with pytest.raises(SatInputError, match="missing; rerun sat-standardise"):
        StandardisedDataset(root).load(0)
    (root / "manifest.jsonl").write_text('{"case": "x"}\n')
    with pytest.raises(SatInputError, match="line 1 is not a manifest entry"):
        StandardisedDataset(root)


# --- SynthSeg-style synthesis ----------------------------------------------------------------------------


def _two_tissues() -> np.ndarray:
    """[96, 96, 32] uint16: background, two large labels and a few small ones."""
    labels = np.zeros((96, 96, 32), np.uint16)
    labels[8:48, 8:88, 4:28] = 2
    labels[48:88, 8:88, 4:28] = 41
    labels[40:56, 40:56, 12:20] = 530
    return labels


def test_synthesis_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    labels = _two_tissues()
    first = synthesize_image(labels, np.random.default_rng(7))
    np.testing.assert_array_equal(first, synthesize_image(labels, np.random.default_rng(7)))
    assert first.dtype == np.float32 and first.shape == labels.shape and np.isfinite(first).all()
    assert abs(float(first.mean())) < 1e-3 and abs(float(first.std()) - 1.0) < 1e-3
    contrasts = [
        float(np.median(image[labels == 2]) - np.median(image[labels == 41]))
        for image in (synthesize_image(labels, np.random.default_rng(seed)) for seed in range(12))
    ]
    assert len(set(contrasts)) == 12  # a new contrast per seed
    assert min(contrasts) < 0 < max(contrasts)  # either tissue can be the brighter
    assert sum(abs(c) > 0.2 for c in contrasts) >= 9  # the two tissues are told apart in most seeds


def test_t1_prior_orders_tissues_and_leaves_unnamed_values_free() -> None:
    labels = _two_tissues()
    labels[8:48, 8:88, 4:10] = 4  # a slab of ventricle in the left hemisphere
    classes = {2: "left cerebral white matter", 41: "right cerebral cortex", 4: "left lateral ventricle", 9: "liver"}
    ranges = t1_mean_ranges(classes)
    assert set(ranges) == {2, 41, 4}  # "liver" is no brain tissue; 530 has no name
    for seed in range(12):
        image = synthesize_image(labels, np.random.default_rng(seed), mean_ranges=ranges)
        white, cortex, fluid = (float(np.median(image[labels == value])) for value in (2, 41, 4))
        assert white > cortex > fluid, f"seed {seed}: T1 order lost ({white:.2f}, {cortex:.2f}, {fluid:.2f})"


def test_synthesis_checks_its_input() -> None:
    labels, rng = _two_tissues(), np.random.default_rng(0)
    with pytest.raises(ValueError, match="3D integer array"):
        synthesize_image(labels.astype(np.float32), rng)
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        synthesize_image(np.full((4, 4, 4), -1, np.int32), rng)
