"""Training augmentation: physical rotations on the anisotropic grid, exact resampling, fine-tuning start."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from satseg.checkpoint import load_checkpoint
from satseg.errors import SatInputError
from satseg.model import get_config
from satseg.text import Vocabulary
from satseg_training.augment import (
    SLAB_FRACTION,
    FieldOfView,
    SpatialAugmentation,
    augment_intensity,
    physical_to_voxel,
    thicken_slices,
)
from satseg_training.config import DataSettings, load_config
from satseg_training.patches import PatchDataset, PhantomPool
from satseg_training.train import initial_weights

SPACING = (1.0, 1.0, 3.0)
PATCH = (24, 24, 8)


def _blocks(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels with an asymmetric L-shaped structure (1) and a box (2), so rotations are distinguishable."""
    labels = np.zeros(shape, dtype=np.int16)
    centre = [size // 2 for size in shape]
    labels[centre[0] - 6 : centre[0] + 6, centre[1] - 2 : centre[1] + 2, :] = 1
    labels[centre[0] + 2 : centre[0] + 6, centre[1] : centre[1] + 8, :] = 1
    labels[centre[0] - 9 : centre[0] - 7, centre[1] + 5 : centre[1] + 9, 2:-2] = 2
    return labels


def test_a_physical_rotation_maps_millimetres_consistently_on_an_anisotropic_grid() -> None:
    rotation = Rotation.from_euler("x", 20, degrees=True).as_matrix()
    voxel = physical_to_voxel(rotation, SPACING)
    vector_mm = np.array([3.0, -5.0, 9.0])
    np.testing.assert_allclose(voxel @ (vector_mm / SPACING), rotation @ vector_mm / SPACING)
    # Not orthogonal in voxels: a rotation that mixes W (1 mm) and D (3 mm) stretches index space.
    assert not np.allclose(voxel @ voxel.T, np.eye(3))


def test_identity_returns_the_centre_and_a_quarter_turn_rotates_the_labels() -> None:
    identity = SpatialAugmentation(np.eye(3))
    margin = identity.margin(PATCH)
    source_shape = tuple(size + 2 * extra for size, extra in zip(PATCH, margin, strict=True))
    labels = _blocks(source_shape)
    image = np.random.default_rng(0).normal(size=source_shape).astype(np.float32)
    centre = tuple(slice(extra, extra + size) for size, extra in zip(PATCH, margin, strict=True))
    out_image, out_labels = identity.apply(image, labels, PATCH)
    np.testing.assert_array_equal(out_labels, labels[centre])
    np.testing.assert_allclose(out_image, image[centre], atol=1e-4)

    quarter = SpatialAugmentation(physical_to_voxel(Rotation.from_euler("z", 90, degrees=True).as_matrix(), SPACING))
    _, turned = quarter.apply(None, labels, PATCH)
    expected = [np.rot90(labels[centre], k, axes=(0, 1)) for k in (1, -1)]
    assert any(np.array_equal(turned, candidate) for candidate in expected)
    assert turned.dtype == labels.dtype


def test_margin_keeps_rotated_corners_inside_the_source() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        spatial = SpatialAugmentation.draw(rng, SPACING)
        margin = np.array(spatial.margin(PATCH))
        half = np.array(PATCH) / 2
        corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
        assert (np.abs(spatial.voxel_matrix @ corners).max(axis=1) <= half + margin).all()


def test_intensity_augmentation_is_deterministic_finite_and_changes_the_image() -> None:
    image = np.random.default_rng(0).normal(size=PATCH).astype(np.float32)
    first = augment_intensity(image, np.random.default_rng(7))
    again = augment_intensity(image, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.float32 and first.shape == PATCH and np.isfinite(first).all()
    assert not np.allclose(first, image, atol=1e-3)


def test_a_field_of_view_keeps_a_box_of_the_patch_and_blanks_image_and_labels_outside() -> None:
    patch = (24, 24, 16)
    image = np.random.default_rng(0).normal(size=patch).astype(np.float32)
    labels = np.ones(patch, dtype=np.int16)
    for seed in range(20):
        view = FieldOfView.draw(np.random.default_rng(seed), patch)
        assert view == FieldOfView.draw(np.random.default_rng(seed), patch)
        out_image, out_labels = view.apply(image, labels, fill=-3.0)
        inside = np.zeros(patch, dtype=bool)
        inside[tuple(slice(begin, end) for begin, end in view.box)] = True
        np.testing.assert_array_equal(out_image[inside], image[inside])
        assert (out_image[~inside] == -3.0).all() and not out_labels[~inside].any() and out_labels[inside].all()
        (_, _), (_, _), (top, bottom) = view.box
        assert SLAB_FRACTION[0] * patch[2] - 1 <= bottom - top <= patch[2]


def test_thick_slices_blur_along_the_superior_axis_only() -> None:
    image = np.zeros((8, 8, 32), dtype=np.float32)
    image[:, :, 16:] = 1.0  # a step along D
    image[2, 2, :] = 5.0  # a line along D: constant there, so unchanged
    thick = thicken_slices(image, np.random.default_rng(3))
    assert thick.shape == image.shape and thick.dtype == np.float32
    np.testing.assert_allclose(thick[2, 2, :], 5.0, atol=1e-5)
    step = thick[0, 0, :]
    assert ((step > 0.05) & (step < 0.95)).any(), "the step should be spread over a thick slice"
    np.testing.assert_allclose(thick[0, 0, :], thick[7, 7, :], atol=1e-6)  # in-plane is untouched


def test_a_partial_field_of_view_only_removes_targets() -> None:
    """The cut comes after the crop and rotation draws: the same sample without it has the same patch, and
    every target of the cut sample lies inside the uncut target of the same term."""
    vocabulary = Vocabulary.load()
    terms = [term.name for term in vocabulary.terms]
    patch = (48, 48, 16)
    plain_settings = DataSettings(phantom=True, positive_centre_probability=1.0)
    cut_settings = dataclasses.replace(plain_settings, field_of_view_probability=1.0, thick_slice_probability=1.0)
    plain = PatchDataset([PhantomPool()], np.ones(1), terms, vocabulary, patch, plain_settings, 2)
    cut = PatchDataset([PhantomPool()], np.ones(1), terms, vocabulary, patch, cut_settings, 2)
    removed = 0
    for index in range(4):
        before, after = plain[index], cut[index]
        targets = {
            int(term): mask
            for term, mask, positive in zip(*(before[k] for k in ("term_ids", "masks", "positive")), strict=True)
            if positive
        }
        for term, mask, positive in zip(after["term_ids"], after["masks"], after["positive"], strict=True):
            if positive:
                assert not (mask.bool() & ~targets[int(term)].bool()).any()
                removed += int(targets[int(term)].sum() - mask.sum())
        assert not torch.equal(before["image"], after["image"])
    assert removed > 0


def test_augmented_phantom_patches_are_deterministic_and_targets_follow_the_labels() -> None:
    vocabulary = Vocabulary.load()
    terms = [term.name for term in vocabulary.terms]
    settings = DataSettings(
        phantom=True,
        positive_centre_probability=1.0,
        spatial_augment_probability=1.0,
        intensity_augment_probability=1.0,
    )
    patch = (48, 48, 16)
    dataset = PatchDataset([PhantomPool()], np.ones(1), terms, vocabulary, patch, settings, 2)
    plain_settings = dataclasses.replace(settings, spatial_augment_probability=0.0, intensity_augment_probability=0.0)
    plain = PatchDataset([PhantomPool()], np.ones(1), terms, vocabulary, patch, plain_settings, 2)
    first, again = dataset[0], dataset[0]
    for key in first:
        assert torch.equal(first[key], again[key])
    assert first["image"].shape == (1, *patch)
    assert not torch.equal(first["image"], plain[0]["image"])
    positive = first["positive"]
    assert positive.any() and all(first["masks"][row].any() for row in range(len(positive)) if positive[row])
    assert not first["masks"][~positive].any()


def test_config_refuses_bad_probabilities_and_two_sources_of_text_layers(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[data]\nphantom = true\n[train]\nsteps = 1\n")
    with pytest.raises(SatInputError, match="spatial_augment_probability"):
        load_config(config, ["data.spatial_augment_probability=1.5"])
    with pytest.raises(SatInputError, match="init_from"):
        load_config(config, ['model.init_from="models/demo"', 'model.text_pretraining="runs/pretrain_text"'])


def test_fine_tuning_starts_from_the_checkpoint_and_refuses_another_size(tiny_checkpoint: Path) -> None:
    expected, _ = load_checkpoint(tiny_checkpoint)
    model = initial_weights(get_config("tiny"), tiny_checkpoint)
    assert model.training
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    other_patch = dataclasses.replace(get_config("tiny"), patch_size=(64, 64, 32))
    with pytest.raises(SatInputError, match="patch"):
        initial_weights(other_patch, tiny_checkpoint)
