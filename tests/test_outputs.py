"""Outputs on the input grid: NIfTI files, the merged label map, statistics, JSON and the preview."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch

from satseg.errors import SatInputError
from satseg.outputs import (
    LabelMapAccumulator,
    OutputOptions,
    keep_largest_component,
    mask_statistics,
    preview_views,
    read_label_extension,
    save_preview,
    write_json,
    write_nifti,
    write_segmentation,
)
from training.data.phantom import make_torso_phantom

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


def test_mask_statistics_in_millilitres() -> None:
    mask = np.zeros(SHAPE, bool)
    mask[:10, :10, :5] = True
    voxel_ml = 0.8 * 0.8 * 2.0 / 1000  # 1.28 mm^3
    assert mask_statistics(mask, voxel_ml) == {"voxels": 500, "volume_ml": 0.64}
    assert mask_statistics(np.zeros(SHAPE, np.uint8), voxel_ml) == {"voxels": 0, "volume_ml": 0.0}
    # Rounded to 0.001 mL (1 mm^3).
    assert mask_statistics(mask[:1, :1, :3], 0.000125)["volume_ml"] == 0.0
    with pytest.raises(ValueError):
        mask_statistics(mask, 0.0)


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
    probabilities = torch.from_numpy((labels == 1).astype(np.float32))
    result = SimpleNamespace(index=0, term="liver", probabilities=probabilities, threshold=0.5)
    pictures = {}
    for modality in ("ct", None):
        out = tmp_path / str(modality)
        write_segmentation(volume, ["liver"], [result], out, OutputOptions(preview=True, modality=modality))
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
    """The writer takes the threshold the segmenter used (its clean-up cut there), not a second setting."""
    volume, labels, _ = make_torso_phantom((40, 32, 12))
    probabilities = torch.from_numpy(np.where(labels == 1, 0.45, 0.05).astype(np.float32))
    for threshold, inside in ((0.5, False), (0.4, True)):
        result = SimpleNamespace(index=0, term="liver", probabilities=probabilities, threshold=threshold)
        out = tmp_path / str(threshold)
        write_segmentation(volume, ["liver"], [result], out, OutputOptions(merged_labelmap=True, statistics=True))
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
