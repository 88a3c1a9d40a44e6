"""Training augmentation on the model grid: random rotation and scaling in millimetres, and image contrast.

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
from monai.transforms import AdjustContrast, Affine, GaussianSmooth
from scipy.spatial.transform import Rotation

from satseg.geometry import PreprocessConfig

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
