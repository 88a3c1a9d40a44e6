"""The model-grid preprocessing and its inverse, checked in world coordinates.

Everything is compared in world millimetres through the affines, so a half-voxel shift or a wrong flip
anywhere in the forward or inverse path shows up (see the sabotage test).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from satseg.engine.preprocess import (
    PreparedVolume,
    _foreground_box,
    intensity_percentiles,
    normalize_intensity,
    prepare,
)
from satseg.errors import SatInputError
from satseg.geometry import Volume, load_volume
from satseg.spec import PreprocessConfig, WindowSpec
from satseg.window import economical_span, window_count


def _rotation(axis: int, degrees: float) -> np.ndarray:
    """[3, 3] rotation about world ``axis``."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = (a for a in range(3) if a != axis)
    rotation = np.eye(3)
    rotation[[i, i, j, j], [i, j, i, j]] = [c, -s, s, c]
    return rotation


def _affine(linear: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    return affine


# Oblique (25 deg about x, 20 deg about z), one flipped axis, anisotropic 0.7 x 1.3 x 2.5 mm.
OBLIQUE = _affine(_rotation(0, 25) @ _rotation(2, 20) @ np.diag([0.7, -1.3, 2.5]), (-20.0, 30.0, -25.0))
# Axes permuted (array axis 0 runs along S) and all flipped: an LPS-like sagittal layout.
PERMUTED = _affine(np.array([[0.0, -0.9, 0.0], [0.0, 0.0, -1.1], [-2.2, 0.0, 0.0]]), (15.0, 40.0, 60.0))
GEOMETRIES = {"oblique": (OBLIQUE, (80, 50, 24)), "permuted": (PERMUTED, (24, 64, 56))}
CONFIGS = {"RAS": PreprocessConfig(), "ASR": PreprocessConfig(orientation="ASR")}


def _centres(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World mm of the voxel centres of a grid: [*shape, 3] float64."""
    index = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _ball(world: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    return np.linalg.norm(world - centre, axis=-1) <= radius


def _body(affine: np.ndarray, shape: tuple[int, int, int], centre: np.ndarray) -> np.ndarray:
    """CT [I, J, K] int16: air (-1000 HU) around a 22 mm ball of soft tissue (40 HU)."""
    return np.where(_ball(_centres(affine, shape), centre, 22.0), 40, -1000).astype(np.int16)


def _linear(world: np.ndarray) -> np.ndarray:
    return 0.5 * world[..., 0] - 0.3 * world[..., 1] + 0.8 * world[..., 2]


def _field(world: np.ndarray) -> np.ndarray:
    """A smooth world-coordinate function: linear plus a gentle wave (|second derivative| <= 0.03 / mm)."""
    return _linear(world) + 3.0 * np.sin(world[..., 0] / 10.0)


def _inside(affine: np.ndarray, shape: tuple[int, ...], other: np.ndarray, other_shape: tuple[int, ...]) -> np.ndarray:
    """[*shape] bool: voxels whose centres lie within the outermost voxel centres of the other grid."""
    index = _centres(np.linalg.inv(other) @ affine, shape)
    return ((index >= 0) & (index <= np.asarray(other_shape) - 1)).all(axis=-1)


def _to_input(prepared: PreparedVolume, values: np.ndarray) -> np.ndarray:
    return prepared.to_input_grid(torch.from_numpy(values.astype(np.float32))).numpy()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _centroid_error_mm(a: np.ndarray, b: np.ndarray, world: np.ndarray) -> float:
    return float(np.linalg.norm(world[a].mean(axis=0) - world[b].mean(axis=0)))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_model_grid_geometry(geometry: tuple[np.ndarray, tuple[int, int, int]], config: PreprocessConfig) -> None:
    affine, shape = geometry
    prepared = prepare(Volume(np.zeros(shape, np.float32), affine), "mri", config)
    assert nib.aff2axcodes(prepared.affine) == tuple(config.orientation)
    np.testing.assert_allclose(np.linalg.norm(prepared.affine[:3, :3], axis=0), config.target_spacing)
    # Direction cosines are the input's: each model axis is parallel to one input axis.
    cosines = prepared.affine[:3, :3] / config.target_spacing
    input_cosines = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(np.sort(np.abs(cosines.T @ input_cosines), axis=1)[:, -1], 1.0, atol=1e-9)
    assert prepared.image.dtype == torch.float32 and prepared.image.shape == prepared.grid_shape


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_forward_samples_the_input_where_the_model_affine_says(
    geometry: tuple[np.ndarray, tuple[int, int, int]],
) -> None:
    affine, shape = geometry
    field = _linear(_centres(affine, shape))
    prepared = prepare(Volume(field.astype(np.float32), affine), "ct", PreprocessConfig(crop_foreground=False))
    assert np.ptp(field) < 1400  # inside the CT window, so the image is an affine function of the field
    expected = _linear(_centres(prepared.affine, prepared.image.shape))
    inside = _inside(prepared.affine, prepared.image.shape, affine, shape)  # no edge clamping there
    image = prepared.image.numpy()
    slope, offset = np.polyfit(expected[inside], image[inside], 1)
    # Linear interpolation reproduces a linear field exactly: any misplacement leaves a residual.
    assert np.abs(slope * expected[inside] + offset - image[inside]).max() < 1e-4


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_smooth_field_round_trip(geometry: tuple[np.ndarray, tuple[int, int, int]], config: PreprocessConfig) -> None:
    affine, shape = geometry
    prepared = prepare(Volume(np.zeros(shape, np.int16), affine), "ct", config)
    back = _to_input(prepared, _field(_centres(prepared.affine, prepared.image.shape)))
    assert back.shape == shape and back.dtype == np.float32
    inside = _inside(affine, shape, prepared.affine, prepared.image.shape)
    assert inside.mean() > 0.5
    # Trilinear error <= sum over axes of h^2 / 8 * |f''| (h <= 3 mm); a half-voxel shift gives about 1.
    np.testing.assert_allclose(back[inside], _field(_centres(affine, shape))[inside], atol=0.1)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_sphere_painted_in_world_lands_on_the_input_grid(
    geometry: tuple[np.ndarray, tuple[int, int, int]], config: PreprocessConfig
) -> None:
    affine, shape = geometry
    world = _centres(affine, shape)
    centre = world.reshape(-1, 3).mean(axis=0) + np.array([2.3, -1.7, 3.1])
    prepared = prepare(Volume(_body(affine, shape, centre), affine), "ct", config)
    assert np.less(prepared.image.shape, prepared.grid_shape).all()  # cropped to the body
    on_model = _ball(_centres(prepared.affine, prepared.image.shape), centre, 14.0)
    back = _to_input(prepared, on_model) > 0.5
    reference = _ball(world, centre, 14.0)
    assert _dice(back, reference) >= 0.95
    assert _centroid_error_mm(back, reference, world) <= 0.5  # half the finest model voxel


@pytest.mark.parametrize("sabotage", ["half_voxel_shift", "flip_input_axis_0", "flip_input_axis_2", "skip_crop_offset"])
def test_the_sphere_check_catches_misplacement(sabotage: str) -> None:
    world = _centres(OBLIQUE, GEOMETRIES["oblique"][1])
    centre = world.reshape(-1, 3).mean(axis=0) + np.array([6.0, -4.0, 5.0])  # off-centre, so flips move it
    prepared = prepare(Volume(_body(OBLIQUE, world.shape[:3], centre), OBLIQUE), "ct")
    model_affine = prepared.affine.copy()
    if sabotage == "half_voxel_shift":
        model_affine[:3, 3] += 0.5 * model_affine[:3, 2]
    if sabotage == "skip_crop_offset":
        model_affine[:3, 3] -= model_affine[:3, :3] @ prepared.crop_start
    back = _to_input(prepared, _ball(_centres(model_affine, prepared.image.shape), centre, 14.0)) > 0.5
    if sabotage.startswith("flip"):
        back = np.flip(back, axis=int(sabotage[-1]))
    reference = _ball(world, centre, 14.0)
    assert _dice(back, reference) < 0.95 or _centroid_error_mm(back, reference, world) > 0.5


def test_crop_uses_the_foreground_box_and_uncrop_puts_values_back() -> None:
    # Axis-aligned at the target spacing: the model grid is the input grid, so boxes compare exactly.
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    array = np.full((40, 30, 20), -1000, np.int16)
    array[10:25, 8:20, 5:12] = 40
    array[9, 8:20, 5:12] = -100  # fat: foreground at > -500 HU (SAT's "> 0" would crop it away)
    prepared = prepare(Volume(array, affine), "ct", PreprocessConfig(crop_margin_mm=3.0))
    np.testing.assert_allclose(prepared.affine[:3, :3], affine[:3, :3])
    assert prepared.crop_start == (9 - 3, 8 - 3, 5 - 1)
    assert prepared.image.shape == (25 + 3 - 6, 20 + 3 - 5, 12 + 1 - 4)
    np.testing.assert_allclose(prepared.affine[:3, 3], affine[:3, :3] @ prepared.crop_start)
    back = _to_input(prepared, np.ones(prepared.image.shape))
    expected = np.zeros(array.shape, np.float32)
    expected[6:28, 5:23, 4:13] = 1.0
    np.testing.assert_array_equal(back, expected)


@pytest.mark.parametrize("trim_margin", [True, False])
def test_a_margin_that_costs_a_window_is_trimmed_never_the_foreground(trim_margin: bool) -> None:
    """With 16x16x8 windows, a 16 x 12 x 7 voxel foreground plus its margin (3, 3, 1 voxels) needs 2 x 2 x 2
    windows where the foreground alone needs one: the margin is trimmed, evenly where it can be."""
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    array = np.full((40, 30, 20), -1000, np.int16)
    array[10:26, 8:20, 5:12] = 40
    window = WindowSpec(patch_size=(16, 16, 8), trim_margin=trim_margin)
    prepared = prepare(Volume(array, affine), "ct", PreprocessConfig(crop_margin_mm=3.0), window)
    spans = [(start, size) for start, size in zip(prepared.crop_start, prepared.image.shape, strict=True)]
    if trim_margin:
        assert spans == [(10, 16), (6, 16), (5, 8)]
    else:
        assert spans == [(7, 22), (5, 18), (4, 9)]
    counts = [window_count(size, patch) for size, patch in zip(prepared.image.shape, window.patch_size, strict=True)]
    assert counts == ([1, 1, 1] if trim_margin else [2, 2, 2])
    back = _to_input(prepared, np.ones(prepared.image.shape))
    assert back[10:26, 8:20, 5:12].all(), "the foreground is never trimmed"


def test_trimming_the_margin_moves_no_intensity() -> None:
    """Normalisation statistics come from the whole margin box (as in training), so the trimmed image is the
    untrimmed one cut, voxel for voxel."""
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    array = np.random.default_rng(3).normal(-900, 50, (40, 30, 20)).astype(np.float32)
    array[10:26, 8:20, 5:12] = np.random.default_rng(4).normal(60, 30, (16, 12, 7))
    config = PreprocessConfig(crop_margin_mm=3.0)
    whole, trimmed = (
        prepare(Volume(array, affine), "ct", config, WindowSpec(patch_size=(16, 16, 8), trim_margin=trim))
        for trim in (False, True)
    )
    offset = [b - a for a, b in zip(whole.crop_start, trimmed.crop_start, strict=True)]
    assert trimmed.image.shape != whole.image.shape
    cut = whole.image[tuple(slice(o, o + n) for o, n in zip(offset, trimmed.image.shape, strict=True))]
    assert torch.equal(trimmed.image, cut)


@pytest.mark.parametrize(
    ("core", "box", "patch", "expected"),
    [
        ((3, 291), (0, 294), 288, (3, 291)),  # the real CT's in-plane axis: one window instead of two
        ((3, 289), (0, 294), 288, (2, 290)),  # trimmed evenly around the foreground
        ((0, 290), (0, 293), 288, (0, 293)),  # the foreground alone needs two windows: nothing to save
        ((5, 30), (2, 33), 96, (2, 33)),  # padded to one window either way
        ((0, 286), (0, 289), 288, (0, 288)),  # a foreground at the grid's edge: trimmed on the other side only
    ],
)
def test_economical_span(core: tuple[int, int], box: tuple[int, int], patch: int, expected: tuple[int, int]) -> None:
    span = economical_span(core, box, patch)
    assert span == expected
    assert box[0] <= span[0] <= core[0] and core[1] <= span[1] <= box[1]
    assert window_count(span[1] - span[0], patch) == window_count(core[1] - core[0], patch)


@pytest.mark.parametrize("shape", [(50, 40, 30), (120, 100, 100)])  # torch.quantile, then numpy above 1M values
def test_percentiles_and_foreground_box_are_monais(shape: tuple[int, int, int]) -> None:
    """Re-stated to keep MONAI's 3.8 s import out of inference: equal to MONAI's, bit for bit."""
    from monai.transforms import generate_spatial_bounding_box, percentile

    image = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 100
    assert intensity_percentiles(image, (0.5, 99.5)) == tuple(float(v) for v in percentile(image, [0.5, 99.5]))
    for threshold in (150.0, 280.0):
        start, stop = generate_spatial_bounding_box(
            image[None], select_fn=lambda x, t=threshold: x > t, allow_smaller=True
        )
        assert _foreground_box(image, "mri", PreprocessConfig(foreground_above=threshold)) == (
            tuple(start),
            tuple(stop),
        )


def test_no_foreground_means_no_crop() -> None:
    prepared = prepare(Volume(np.full((20, 20, 9), -1000, np.int16), np.eye(4)), "ct")
    assert prepared.crop_start == (0, 0, 0) and prepared.image.shape == prepared.grid_shape
    assert torch.all(prepared.image == 0)


def test_ct_normalisation_clips_then_z_scores() -> None:
    hu = torch.tensor([-1000.0, -500.0, 0.0, 40.0, 1000.0, 3000.0])
    clipped = np.array([-500.0, -500.0, 0.0, 40.0, 1000.0, 1000.0])
    expected = (clipped - clipped.mean()) / clipped.std()
    out = normalize_intensity(hu.to(torch.int16), "ct")
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(20, 30, 40), (256, 256, 260)], ids=["small", "past-quantile-limit"])
def test_mr_normalisation_clips_percentiles(shape: tuple[int, int, int]) -> None:
    image = torch.from_numpy(np.random.default_rng(1).gamma(2.0, 100.0, size=shape).astype(np.float32))
    image.view(-1)[:10] = 1e6  # outliers
    reference = image.numpy().astype(np.float64)
    clipped = np.clip(reference, *np.percentile(reference, [0.5, 99.5]))
    out = normalize_intensity(image, "mri")
    assert image.view(-1)[0] == 1e6  # the input is untouched
    np.testing.assert_allclose(out.numpy(), (clipped - clipped.mean()) / clipped.std(), atol=1e-4)


@pytest.mark.parametrize("modality", ["ct", "mri", "pet"])
def test_constant_image_normalises_to_zeros(modality: str) -> None:
    out = normalize_intensity(torch.full((4, 5, 6), 7.0), modality)
    assert torch.equal(out, torch.zeros(4, 5, 6))


def test_bad_inputs() -> None:
    with pytest.raises(SatInputError, match='unknown modality "xray"; accepted: ct, mri, us, pet'):
        normalize_intensity(torch.zeros(2, 2, 2), "xray")
    for orientation in ["RRS", "RAX", "ras", "RA"]:
        with pytest.raises(SatInputError, match="orientation"):
            PreprocessConfig(orientation=orientation)
    with pytest.raises(SatInputError, match="target spacing"):
        PreprocessConfig(target_spacing=(1.0, 0.0, 3.0))
    prepared = prepare(Volume(np.zeros((8, 8, 8), np.float32), np.eye(4)), "mri")
    with pytest.raises(ValueError, match="expected"):
        prepared.to_input_grid(torch.zeros(3, 3, 3))


def test_real_mr_labels_survive_the_round_trip(shared_data: Path) -> None:
    """Labels of a real LPS MR, sampled onto the model grid by nearest neighbour, come back in place."""
    folder = shared_data / "totalseg"
    volume, labels = (
        load_volume(folder / "example_mr_sm.nii.gz"),
        load_volume(folder / "example_seg_mr.nii.gz"),
    )
    prepared = prepare(volume, "mri")
    to_labels = np.linalg.inv(labels.affine) @ prepared.affine
    index = np.rint(_centres(to_labels, prepared.image.shape)).astype(int)
    index = np.clip(index, 0, np.asarray(labels.shape) - 1)  # the model grid overhangs by < 1 voxel
    on_model = labels.array[index[..., 0], index[..., 1], index[..., 2]]
    for label in np.unique(labels.array)[1:4]:
        back = _to_input(prepared, on_model == label) > 0.5
        assert _dice(back, labels.array == label) >= 0.98


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_labels_land_on_the_image_grid_by_nearest_neighbour(geometry: tuple[np.ndarray, tuple[int, int, int]]) -> None:
    affine, shape = geometry  # oblique with a flipped axis, and permuted with all axes flipped
    world = _centres(affine, shape)
    centre = world.reshape(-1, 3).mean(axis=0) + np.array([2.3, -1.7, 3.1])
    labels = np.zeros(shape, np.int32)
    labels[_ball(world, centre, 12.0)] = 300
    labels[_ball(world, centre + np.array([0.0, 0.0, 12.0]), 6.0)] = 7  # painted over part of the first ball
    prepared = prepare(Volume(_body(affine, shape, centre), affine), "ct")
    on_model = prepared.labels_to_grid(labels)
    assert on_model.dtype == np.uint16 and on_model.shape == tuple(prepared.image.shape)
    assert set(np.unique(on_model).tolist()) == {0, 7, 300}
    model_world = _centres(prepared.affine, on_model.shape)
    for value in (7, 300):
        error = np.linalg.norm(model_world[on_model == value].mean(axis=0) - world[labels == value].mean(axis=0))
        assert error <= 1.0  # within the finest model voxel; a half-voxel slip along z alone is 1.5 mm
    with pytest.raises(ValueError, match="integer dtype"):
        prepared.labels_to_grid(labels.astype(np.float32))
    with pytest.raises(SatInputError, match=r"0\.\.65535"):
        prepared.labels_to_grid(np.full(shape, -1, np.int16))
