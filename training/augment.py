"""Training augmentation on the model grid: random rotation and scaling in millimetres, image contrast, and
the acquisitions real CTs come from (a partial field of view, thick slices).

Parameters are drawn from the sample's own generator, so a sample stays a pure function of its index;
MONAI's deterministic ``Affine``, ``GaussianSmooth`` and ``AdjustContrast`` do the resampling and filtering.

Rotations are physical: the model grid is anisotropic (1 x 1 x 3 mm), so a rotation ``R`` in millimetres
is ``diag(1/s) R diag(s)`` in voxels. Rotating about the ``D`` (superior) axis and the ``H`` (left-right)
axis covers the common acquisition differences: a patient turned on the table and a tilted gantry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import AdjustContrast, Affine, GaussianSmooth, Resize
from scipy.spatial.transform import Rotation

from satseg.spec import PreprocessConfig

MODEL_SPACING_MM = PreprocessConfig().target_spacing
MAX_ROTATION_DEG = (20.0, 0.0, 20.0)
"""Largest rotation about the H, W and D axes; none about W (anterior-posterior), which is rare in practice."""
SCALE_RANGE = (0.85, 1.15)
"""Zoom per axis, drawn independently: organ sizes vary between people."""
MAX_NOISE_STD = 0.1
"""Gaussian noise, in units of the z-scored image."""
BLUR_SIGMA_VOXELS = (0.0, 1.0)
"""Gaussian blur sigma in-plane (``H``, ``W``); along ``D`` it is a third of it (3 mm voxels)."""
GAMMA_RANGE = (0.7, 1.5)
BRIGHTNESS_SHIFT = 0.1
CONTRAST_SCALE = (0.9, 1.1)
SLAB_FRACTION = (0.2, 1.0)
"""Share of the patch's superior axis (``D``) a field of view keeps: a thin slab up to the whole patch."""
IN_PLANE_FRACTION = (0.5, 1.0)
"""Share of ``H`` or ``W`` a field of view keeps when it cuts that axis (half the time each): a body wider
than the reconstruction circle, or an organ cut at the scan's side."""
SLICE_THICKNESS_MM = (3.0, 6.0)
"""Slice thickness simulated along ``D``: real CTs run from 0.6 to 5 mm; thinner than the grid's 3 mm they are
resampled to 3 mm anyway, thicker they hold less detail along ``D`` than the grid shows."""


@dataclass(frozen=True)
class SpatialAugmentation:
    """A rotation and zoom about the patch centre, as the ``[3, 3]`` map from output to input voxels."""

    voxel_matrix: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, spacing: Sequence[float] = MODEL_SPACING_MM) -> SpatialAugmentation:
        angles = [rng.uniform(-limit, limit) for limit in MAX_ROTATION_DEG]
        rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        zoom = np.diag(rng.uniform(*SCALE_RANGE, size=3))
        return cls(physical_to_voxel(rotation @ zoom, spacing))

    def margin(self, patch: Sequence[int]) -> tuple[int, int, int]:
        """Voxels to add on each side of a patch so that its transformed corners stay inside the source."""
        half = np.asarray(patch, dtype=np.float64) / 2
        corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(3, -1)
        reach = np.abs(self.voxel_matrix @ corners).max(axis=1)
        extra = np.ceil(np.maximum(reach - half, 0)).astype(int) + 1
        return int(extra[0]), int(extra[1]), int(extra[2])

    def apply(
        self, image: np.ndarray | None, labels: np.ndarray, patch: Sequence[int]
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Resample a source region centred on the patch: image linear, labels nearest neighbour.

        Args:
            image: ``[H', W', D']`` float32 or ``None`` (label-only cases).
            labels: ``[H', W', D']`` integer labels, the same grid as ``image``.
            patch: output ``(H, W, D)``; the output's centre is the source's centre.

        Returns:
            ``(image [H, W, D] float32 or None, labels [H, W, D])``.
        """
        affine = np.eye(4)
        affine[:3, :3] = self.voxel_matrix
        out_labels = _resample(labels.astype(np.float32), affine, patch, "nearest", "zeros")
        out_image = None if image is None else _resample(image, affine, patch, "bilinear", "border")
        return out_image, np.rint(out_labels).astype(labels.dtype)


def physical_to_voxel(matrix: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """A linear map in millimetres as the same map in voxel indices of a grid with ``spacing``."""
    scale = np.diag(np.asarray(spacing, dtype=np.float64))
    return np.linalg.inv(scale) @ matrix @ scale


def _resample(array: np.ndarray, affine: np.ndarray, patch: Sequence[int], mode: str, padding: str) -> np.ndarray:
    transform = Affine(affine=affine, spatial_size=tuple(patch), mode=mode, padding_mode=padding, image_only=True)
    return np.asarray(transform(torch.from_numpy(np.ascontiguousarray(array))[None]))[0]


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, gamma, brightness/contrast and noise on a z-scored ``[H, W, D]`` float32 image."""
    sigma = rng.uniform(*BLUR_SIGMA_VOXELS)
    out = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    if sigma > 0.25:
        out = GaussianSmooth(sigma=(sigma, sigma, sigma / 3))(out)
    out = AdjustContrast(gamma=float(rng.uniform(*GAMMA_RANGE)))(out)
    result = np.asarray(out, dtype=np.float32)[0]
    result = result * rng.uniform(*CONTRAST_SCALE) + rng.uniform(-BRIGHTNESS_SHIFT, BRIGHTNESS_SHIFT)
    return (result + rng.normal(0.0, rng.uniform(0.0, MAX_NOISE_STD), size=result.shape)).astype(np.float32)


@dataclass(frozen=True)
class FieldOfView:
    """The box of a patch an acquisition covered, as ``(begin, end)`` voxels per axis; outside it is no image.

    Real scans cover part of the abdomen or a thin slab, and cut organs at their edges: outside the box
    the image is the fill (air) and nothing is labelled, as at inference, where outside the scan is padding.
    """

    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    @classmethod
    def draw(cls, rng: np.random.Generator, patch: Sequence[int]) -> FieldOfView:
        fractions = [
            rng.uniform(*IN_PLANE_FRACTION) if rng.random() < 0.5 else 1.0,
            rng.uniform(*IN_PLANE_FRACTION) if rng.random() < 0.5 else 1.0,
            rng.uniform(*SLAB_FRACTION),
        ]
        box = []
        for size, fraction in zip(patch, fractions, strict=True):
            kept = max(1, round(size * fraction))
            begin = int(rng.integers(0, size - kept + 1))
            box.append((begin, begin + kept))
        return cls((box[0], box[1], box[2]))

    def apply(self, image: np.ndarray, labels: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray]:
        """``image`` and ``labels`` (``[H, W, D]``) with everything outside the box set to ``fill`` and 0."""
        inside = tuple(slice(begin, end) for begin, end in self.box)
        out_image = np.full_like(image, fill)
        out_labels = np.zeros_like(labels)
        out_image[inside] = image[inside]
        out_labels[inside] = labels[inside]
        return out_image, out_labels


def thicken_slices(
    image: np.ndarray, rng: np.random.Generator, spacing: Sequence[float] = MODEL_SPACING_MM
) -> np.ndarray:
    """An ``[H, W, D]`` float32 image as if acquired with thicker slices (``SLICE_THICKNESS_MM``) and resampled
    back to the grid: averaged down along ``D`` to the drawn thickness, then linearly up to the patch again."""
    thickness = rng.uniform(*SLICE_THICKNESS_MM)
    depth = image.shape[2]
    thick_depth = max(2, round(depth * spacing[2] / thickness))
    if thick_depth >= depth:
        return image
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    down = Resize((image.shape[0], image.shape[1], thick_depth), mode="area")(volume)
    up = Resize(image.shape, mode="trilinear")(down)
    return np.asarray(up, dtype=np.float32)[0]
