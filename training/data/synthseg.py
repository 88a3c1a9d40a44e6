"""SynthSeg-style training images synthesised from label maps on the fly (Billot et al., 2023).

Every call draws a new contrast: a random mean and spread per label value, a smooth multiplicative bias
field, blur and a random acquisition resolution, so a model trained on them sees no single MR contrast
and learns shape instead. Values are drawn per label value, including values that are no class (SynthSeg's
extra-cerebral tissues 502-530), so the whole head is painted.

A T1 prior (:func:`t1_mean_ranges`) narrows the named tissues' means to T1-weighted order (fluid dark, grey
matter mid, white matter bright) for some images, as SynthSeg's contrast-specific variant does: the data's
README asks for "T1-like (or any-contrast)" images, and a small model learns a real T1 faster from both.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from satseg.engine.preprocess import normalize_intensity

MEAN_RANGE: tuple[float, float] = (0.0, 255.0)
"""Each label value's mean intensity is uniform in this range."""
STD_RANGE: tuple[float, float] = (0.0, 25.0)
"""Each label value's intensity spread (std of its Gaussian noise) is uniform in this range."""
BACKGROUND_ZERO_PROBABILITY = 0.5
"""Probability that label 0 is black (mean and spread 0), as outside the head in a skull-stripped scan."""
BIAS_LOG_STD_RANGE: tuple[float, float] = (0.0, 0.4)
"""Std of the log of the bias field, uniform in this range (0.4: the field mostly spans about 0.5..2)."""
BIAS_CONTROL_SPACING_MM = 40.0
"""Distance between the bias field's random control points: the field varies over a few centimetres."""
BLUR_SIGMA_MM_RANGE: tuple[float, float] = (0.0, 1.0)
"""Gaussian blur sigma per axis in mm, uniform in this range."""
SKULL_STRIP_PROBABILITY = 0.5
"""Probability that everything outside the brain is black, as in a skull-stripped scan (templates, many pipelines)."""
RESOLUTION_AXIS_PROBABILITY = 0.5
"""Probability that an axis is acquired at a lower resolution."""
RESOLUTION_FACTOR_RANGE: tuple[float, float] = (1.0, 3.0)
"""The voxel size of such an axis is multiplied by a factor uniform in this range (3 mm slices up to 9 mm)."""

T1_TISSUE_MEAN_RANGES: dict[str, tuple[float, float]] = {
    "cerebral white matter": (170.0, 230.0),
    "cerebellar white matter": (170.0, 230.0),
    "ventral diencephalon": (150.0, 210.0),
    "brainstem": (150.0, 210.0),
    "globus pallidus": (140.0, 200.0),
    "thalamus": (130.0, 190.0),
    "putamen": (110.0, 170.0),
    "caudate nucleus": (100.0, 160.0),
    "nucleus accumbens": (100.0, 160.0),
    "cerebral cortex": (90.0, 150.0),
    "cerebellar cortex": (90.0, 150.0),
    "hippocampus": (90.0, 150.0),
    "amygdala": (90.0, 150.0),
    "lateral ventricle": (10.0, 70.0),
    "inferior lateral ventricle": (10.0, 70.0),
    "third ventricle": (10.0, 70.0),
    "fourth ventricle": (10.0, 70.0),
    "cerebrospinal fluid": (10.0, 70.0),
}
"""Mean intensity ranges (of 0-255) of brain tissues on a T1-weighted scan, by term without its side.

Textbook T1 order: white matter brightest, the myelinated deep nuclei (pallidum, thalamus) between it and
the cortex, fluid darkest; grey/white ratios of 0.4-0.9 cover scanners and sequences. Not measured on any
evaluation image.
"""


def t1_mean_ranges(classes: Mapping[int, str]) -> dict[int, tuple[float, float]]:
    """T1 mean ranges for the label values of ``classes`` (value -> vocabulary term) that name a brain tissue.

    "left thalamus" and "right thalamus" take the range of "thalamus"; values that name no listed tissue
    (and values with no name, like the extra-cerebral tissues) are left out, so they keep any contrast.
    """
    ranges = {}
    for value, term in classes.items():
        tissue = term.removeprefix("left ").removeprefix("right ")
        if tissue in T1_TISSUE_MEAN_RANGES:
            ranges[int(value)] = T1_TISSUE_MEAN_RANGES[tissue]
    return ranges


def synthesize_image(
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0),
    brain: np.ndarray | None = None,
    mean_ranges: Mapping[int, tuple[float, float]] | None = None,
) -> np.ndarray:
    """A random-contrast image of a label map.

    Steps: a mean (uniform 0-255) and a spread per label value, painted with Gaussian noise; a smooth
    multiplicative bias field (random log-field on a coarse grid, upsampled, exponentiated); Gaussian blur
    with a random sigma; a random resolution (average down by a random factor along random axes, then
    trilinear back up); with ``brain`` given, skull stripping half of the time (zero outside it, after the
    acquisition steps, so the brain's edge stays sharp as a brain mask leaves it); then SAT's MRI
    normalisation (:func:`satseg.geometry.normalize_intensity`).

    Args:
        labels: ``[H, W, D]`` label values, any integer dtype, each in 0..65535 (e.g. a training crop of a
            standardised map).
        rng: the source of every random draw: the same seed and labels give the same image.
        spacing: voxel size in mm along the axes of ``labels`` (the model grid's 1x1x3 by default), so
            the bias field, blur and resolution are drawn in millimetres.
        brain: ``[H, W, D]`` bool, the voxels a skull-stripping mask keeps (``None``: never stripped).
        mean_ranges: label value -> ``(low, high)``: those values' means are uniform in their own range
            instead of 0-255 (:func:`t1_mean_ranges` for a T1-like image; ``None``: any contrast).

    Returns:
        ``[H, W, D]`` float32, finite, z-scored (clipped to the 0.5/99.5 percentiles, mean 0, std 1).

    Raises:
        ValueError: ``labels`` is not a 3D integer array with values in 0..65535.
    """
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 3D integer array, got {labels.dtype} of shape {labels.shape}")
    if brain is not None and brain.shape != labels.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from the labels' {labels.shape}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > np.iinfo(np.uint16).max):
        raise ValueError(f"label values must be in 0..65535, got {int(labels.min())}..{int(labels.max())}")
    spacing_mm = np.asarray(spacing, dtype=np.float64)
    image = _paint(labels, rng, mean_ranges or {})
    image *= _bias_field(labels.shape, spacing_mm, rng)
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(*BLUR_SIGMA_MM_RANGE, size=3) / spacing_mm)
    image = _random_resolution(image, rng)
    if brain is not None and rng.random() < SKULL_STRIP_PROBABILITY:
        image[~brain] = 0.0
    return normalize_intensity(torch.from_numpy(image), "mri").numpy()


def _paint(labels: np.ndarray, rng: np.random.Generator, mean_ranges: Mapping[int, tuple[float, float]]) -> np.ndarray:
    """``[H, W, D]`` float32 >= 0: each label value's random mean plus its random-spread Gaussian noise."""
    count = int(labels.max()) + 1 if labels.size else 1
    # Lookup tables over every value up to the largest: indexing is far faster than np.unique's sort.
    means = rng.uniform(*MEAN_RANGE, size=count).astype(np.float32)
    for value, (low, high) in mean_ranges.items():
        if value < count:
            means[value] = rng.uniform(low, high)
    spreads = rng.uniform(*STD_RANGE, size=count).astype(np.float32)
    if rng.random() < BACKGROUND_ZERO_PROBABILITY:
        means[0] = spreads[0] = 0.0
    index = labels.astype(np.intp, copy=False)
    image = means[index]
    image += spreads[index] * rng.standard_normal(labels.shape, dtype=np.float32)
    return np.maximum(image, 0.0, out=image)  # intensities are non-negative, as in a magnitude image


def _bias_field(shape: tuple[int, ...], spacing_mm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``shape`` float32 > 0: exp of a random field on control points about 40 mm apart, trilinearly upsampled."""
    extent_mm = np.asarray(shape) * spacing_mm
    coarse = np.maximum(2, np.ceil(extent_mm / BIAS_CONTROL_SPACING_MM).astype(int) + 1)
    log_field = rng.normal(0.0, rng.uniform(*BIAS_LOG_STD_RANGE), size=tuple(coarse)).astype(np.float32)
    field = F.interpolate(torch.from_numpy(log_field)[None, None], size=shape, mode="trilinear", align_corners=True)
    return field[0, 0].exp_().numpy()


def _random_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` as if acquired with coarser voxels along random axes: box-averaged down, trilinear back up."""
    factors = np.where(rng.random(3) < RESOLUTION_AXIS_PROBABILITY, rng.uniform(*RESOLUTION_FACTOR_RANGE, size=3), 1.0)
    coarse = tuple(int(n) for n in np.maximum(1, np.round(np.asarray(image.shape) / factors)))
    if coarse == image.shape:
        return image
    # Averaging voxels down is how a larger voxel integrates signal (and it avoids aliasing).
    low = F.adaptive_avg_pool3d(torch.from_numpy(image)[None, None], coarse)
    return F.interpolate(low, size=image.shape, mode="trilinear", align_corners=False)[0, 0].numpy()
