"""A synthetic torso phantom: organ-shaped ellipsoids with CT-like HU on any grid.

Shapes are defined in RAS world millimetres and sampled at each voxel's world position, so the
same anatomy appears at the same place whatever the affine (oblique, flipped, anisotropic).
Tests and the demo use it where no real data may be shipped.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from satseg.geometry.volume import Volume
from satseg.outputs import write_json


@dataclass(frozen=True)
class Ellipsoid:
    """An organ: its term, its TotalSegmentator class name, its HU, a centre and semi-axes in RAS mm.

    The centre is relative to the torso centre.
    """

    name: str
    class_name: str
    hounsfield: float
    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]


# Painted in order, later ones over earlier ones; RAS+: +x is the patient's right.
TORSO_ORGANS: tuple[Ellipsoid, ...] = (
    Ellipsoid("liver", "liver", 60.0, (70.0, 10.0, 40.0), (65.0, 55.0, 55.0)),
    Ellipsoid("spleen", "spleen", 45.0, (-80.0, -20.0, 50.0), (28.0, 35.0, 40.0)),
    Ellipsoid("stomach", "stomach", 20.0, (-40.0, 35.0, 50.0), (35.0, 25.0, 30.0)),
    Ellipsoid("right kidney", "kidney_right", 30.0, (55.0, -45.0, -20.0), (22.0, 25.0, 45.0)),
    Ellipsoid("left kidney", "kidney_left", 30.0, (-55.0, -45.0, -15.0), (22.0, 25.0, 45.0)),
    Ellipsoid("spinal cord", "spinal_cord", 25.0, (0.0, -60.0, 0.0), (7.0, 7.0, 400.0)),
)
BODY_SEMI_AXES = (150.0, 105.0)
"""Semi-axes (x, y) in mm of the elliptic body cross-section, infinite along z."""


def class_names() -> dict[str, str]:
    """The label map's names as TotalSegmentator writes them (``{"1": "liver", "5": "kidney_left", ...}``)."""
    return {str(value): organ.class_name for value, organ in enumerate(TORSO_ORGANS, start=1)}


def world_coordinates(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """RAS mm of every voxel centre: ``[I, J, K, 3]`` float32."""
    indices = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3].astype(np.float32) @ indices + affine[:3, 3:4].astype(np.float32)
    return world.T.reshape(*shape, 3)


def centred_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rotation_deg: float = 0.0
) -> np.ndarray:
    """An affine with ``spacing``, rotated about z and x by ``rotation_deg``, centring the grid at the origin."""
    angle = np.deg2rad(rotation_deg)
    about_z = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = about_x @ about_z @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


def make_torso_phantom(
    shape: tuple[int, int, int] = (120, 100, 40),
    affine: np.ndarray | None = None,
    *,
    noise_hu: float = 10.0,
    seed: int = 0,
) -> tuple[Volume, np.ndarray, dict[int, str]]:
    """A CT-like torso and its labels on the grid ``(shape, affine)``.

    Returns ``(volume, labels, names)``: ``volume.array`` int16 HU ``[I, J, K]`` (air -1000,
    fat -100, tissue around 40, organs as in :data:`TORSO_ORGANS`), ``labels`` uint8 ``[I, J, K]``
    with 0 = background, and ``names`` mapping each label value to its vocabulary term.
    Default affine: 2.5 x 2.5 x 5 mm, axis-aligned, centred at the origin.
    """
    affine = centred_affine(shape, (2.5, 2.5, 5.0)) if affine is None else np.asarray(affine, dtype=np.float64)
    image = np.empty(shape, dtype=np.int16)
    labels = np.empty(shape, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    # Slab by slab along the last axis, so a 512x512x300 phantom needs no 78M x 3 coordinate array.
    slab = max(1, 4_000_000 // (shape[0] * shape[1]))
    for start in range(0, shape[2], slab):
        stop = min(start + slab, shape[2])
        slab_affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, start], [0, 0, 0, 1]], float)
        hounsfield, slab_labels = paint_torso(world_coordinates((shape[0], shape[1], stop - start), slab_affine))
        hounsfield += rng.normal(0.0, noise_hu, size=hounsfield.shape).astype(np.float32)
        image[..., start:stop] = np.round(hounsfield)
        labels[..., start:stop] = slab_labels
    names = {value: organ.name for value, organ in enumerate(TORSO_ORGANS, start=1)}
    return Volume(image, affine, modality="ct"), labels, names


def paint_torso(world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32) and labels (uint8) of the phantom at world positions ``[..., 3]`` (RAS mm)."""
    radius = np.hypot(world[..., 0] / BODY_SEMI_AXES[0], world[..., 1] / BODY_SEMI_AXES[1])
    image = np.where(radius < 1.0, 40.0, -1000.0).astype(np.float32)
    image[(radius >= 0.93) & (radius < 1.0)] = -100.0  # subcutaneous fat
    labels = np.zeros(world.shape[:-1], dtype=np.uint8)
    for value, organ in enumerate(TORSO_ORGANS, start=1):
        offset = (world - np.array(organ.centre, dtype=np.float32)) / np.array(organ.semi_axes, dtype=np.float32)
        inside = (offset**2).sum(axis=-1) <= 1.0
        image[inside] = organ.hounsfield
        labels[inside] = value
    return image, labels


def main(argv: list[str] | None = None) -> int:
    """``sat-phantom``: write a synthetic torso CT (and optionally its label map) as NIfTI."""
    parser = argparse.ArgumentParser(
        prog="sat-phantom",
        description="Write a synthetic CT torso phantom (liver, spleen, stomach, kidneys, spinal cord).",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="CT image to write (.nii.gz)")
    parser.add_argument("--labels", type=Path, help="also write the label map here (.nii.gz)")
    parser.add_argument("--names", type=Path, help="also write the label names here (TotalSegmentator-style JSON)")
    parser.add_argument("--shape", type=int, nargs=3, default=(120, 100, 40), metavar=("I", "J", "K"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 2.5, 5.0), metavar=("X", "Y", "Z"))
    parser.add_argument("--rotate", type=float, default=0.0, help="oblique rotation in degrees (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    affine = centred_affine(shape, tuple(args.spacing), args.rotate)
    volume, labels, names = make_torso_phantom(shape, affine, seed=args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume.array, volume.affine), args.output)
    if args.labels:
        nib.save(nib.Nifti1Image(labels, volume.affine), args.labels)
    if args.names:
        write_json(class_names(), args.names)
    print(f"wrote {args.output} ({'x'.join(map(str, shape))}, labels: {', '.join(names.values())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
