"""A PNG overview: three orthogonal slices with the label map overlaid, in radiological orientation."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from satseg.atomic import atomic_file
from satseg.outputs.nifti import DISCLAIMER

OVERLAY_ALPHA = 0.45
WINDOW_PERCENTILES = (1.0, 99.0)
CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)
"""HU limits of the usual abdominal soft-tissue window (width 400, level 40)."""


@dataclass(frozen=True)
class PreviewView:
    """One slice ready for ``imshow(origin="upper")``.

    Attributes:
        name: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        image: ``[rows, cols]`` float32 intensities.
        labels: ``[rows, cols]`` uint16 label values, 0 background.
        aspect: pixel height / pixel width (from the voxel spacing).
        edges: anatomical direction at the left, right, top and bottom edge.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    aspect: float
    edges: tuple[str, str, str, str]


# name, RAS axis cut, (RAS axis across the columns, RAS axis down the rows), edges
_VIEWS = (
    ("axial", 2, (0, 1), ("R", "L", "A", "P")),
    ("coronal", 1, (0, 2), ("R", "L", "S", "I")),
    ("sagittal", 0, (1, 2), ("A", "P", "S", "I")),
)


def preview_views(
    image: np.ndarray, affine: np.ndarray, labelmap: np.ndarray
) -> tuple[PreviewView, PreviewView, PreviewView]:
    """Axial, coronal and sagittal slices through the centroid of the labelled voxels.

    Both volumes are reoriented to the closest RAS voxel order first, so the views do not
    depend on how the input stores its axes (an LPS volume gives the same views as RAS).
    Display is radiological: patient right on the left of axial and coronal views,
    anterior at the top of axial views and on the left of sagittal views, superior at the top.

    Args:
        image: ``[I, J, K]`` real-valued intensities.
        affine: ``[4, 4]`` voxel-to-RAS+ millimetres.
        labelmap: ``[I, J, K]`` integer label values, 0 background.

    Returns:
        The three views; through the volume centre when nothing is labelled.
    """
    if image.ndim != 3 or image.shape != labelmap.shape:
        raise ValueError(f"image {image.shape} and label map {labelmap.shape} must be the same 3D shape")
    orientation = nib.orientations.io_orientation(affine)
    image_ras = nib.orientations.apply_orientation(image, orientation)
    labels_ras = nib.orientations.apply_orientation(labelmap, orientation)
    spacing_ras = np.empty(3)
    spacing_ras[orientation[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    centre = _centroid(labels_ras > 0)

    views = []
    for name, cut_axis, (col_axis, row_axis), edges in _VIEWS:
        index = [slice(None)] * 3
        index[cut_axis] = centre[cut_axis]  # type: ignore[call-overload]
        # The slice is [col_axis, row_axis] in increasing RAS; flipping both and transposing
        # puts R/A/S (the increasing ends) on the left and at the top.
        views.append(
            PreviewView(
                name=name,
                image=np.flip(image_ras[tuple(index)]).T.astype(np.float32),
                labels=np.flip(labels_ras[tuple(index)]).T.astype(np.uint16),
                aspect=float(spacing_ras[row_axis] / spacing_ras[col_axis]),
                edges=edges,
            )
        )
    return tuple(views)  # type: ignore[return-value]


def save_preview(
    image: np.ndarray,
    affine: np.ndarray,
    labelmap: np.ndarray,
    labels: Mapping[int, str],
    path: Path,
    *,
    title: str | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write a PNG of :func:`preview_views` with coloured overlays and a legend, atomically.

    Grey values are windowed to ``window`` (e.g. :data:`CT_SOFT_TISSUE_WINDOW`), else to the
    1st-99th percentile of the three slices; each label keeps
    its colour whichever labels are visible; the legend lists the labels visible in the slices.

    Args:
        image: ``[I, J, K]`` real-valued intensities.
        affine: ``[4, 4]`` voxel-to-RAS+ millimetres.
        labelmap: ``[I, J, K]`` uint16 label values, 0 background.
        labels: name of every label value that occurs.
        path: the ``.png`` to write.
        title: shown above the slices.
        window: ``(low, high)`` grey-value limits; default from the slices' percentiles.

    Returns:
        ``path``.
    """
    views = preview_views(image, affine, labelmap)
    low, high = window or _display_window(views)
    colours = _label_colours(labels)
    shown = np.unique(np.concatenate([view.labels.ravel() for view in views]))
    visible = [int(value) for value in shown if value != 0]
    unnamed = [value for value in visible if value not in colours]
    if unnamed:
        raise ValueError(f"label values {unnamed} have no name")
    lookup = np.zeros((max(visible, default=0) + 1, 4), dtype=np.float32)
    for value in visible:
        lookup[value] = (*colours[value], OVERLAY_ALPHA)

    figure = Figure(figsize=(12, 5), facecolor="black", layout="constrained")
    FigureCanvasAgg(figure)
    # Panel widths in proportion to each slice's physical width/height, so all are equally tall.
    ratios = [view.image.shape[1] / (view.image.shape[0] * view.aspect) for view in views]
    for axes, view in zip(figure.subplots(1, 3, width_ratios=ratios), views, strict=True):
        axes.imshow(view.image, cmap="gray", vmin=low, vmax=high, aspect=view.aspect, interpolation="nearest")
        axes.imshow(lookup[view.labels], aspect=view.aspect, interpolation="nearest")
        axes.set_title(view.name, color="white")
        axes.set_axis_off()
        left, right, top, bottom = view.edges
        for text, xy, align in (
            (left, (0.01, 0.5), {"ha": "left", "va": "center"}),
            (right, (0.99, 0.5), {"ha": "right", "va": "center"}),
            (top, (0.5, 0.99), {"ha": "center", "va": "top"}),
            (bottom, (0.5, 0.01), {"ha": "center", "va": "bottom"}),
        ):
            axes.text(*xy, text, transform=axes.transAxes, color="yellow", fontsize=9, **align)
    if visible:
        handles = [Patch(color=colours[value], label=labels[value]) for value in visible]
        figure.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 6),
            frameon=False,
            labelcolor="white",
        )
    if title:
        figure.suptitle(title, color="white")
    figure.text(0.995, 0.005, DISCLAIMER, color="grey", fontsize=7, ha="right", va="bottom")
    with atomic_file(Path(path)) as file:
        figure.savefig(file, format="png", dpi=100, facecolor="black")
    return Path(path)


def _centroid(mask: np.ndarray) -> tuple[int, int, int]:
    """Rounded centre of mass of ``[X, Y, Z]`` bool ``mask``; the volume centre if it is empty.

    Per-axis projections (three reductions) instead of ``np.argwhere``, which would hold
    three int64 coordinates per labelled voxel.
    """
    total = int(np.count_nonzero(mask))
    if total == 0:
        return tuple(size // 2 for size in mask.shape)  # type: ignore[return-value]
    centre = []
    for axis in range(3):
        counts = mask.sum(axis=tuple(other for other in range(3) if other != axis))
        centre.append(round(float(np.dot(np.arange(mask.shape[axis]), counts)) / total))
    return tuple(centre)  # type: ignore[return-value]


def _display_window(views: tuple[PreviewView, ...]) -> tuple[float, float]:
    """Grey-value limits: the 1st and 99th percentiles of the shown pixels (NaN ignored)."""
    pixels = np.concatenate([view.image.ravel() for view in views])
    low, high = (float(value) for value in np.nanpercentile(pixels, WINDOW_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def qualitative_palette() -> list[tuple[float, float, float]]:
    """60 distinct RGB colours in [0, 1]: matplotlib's tab20, tab20b and tab20c, each hue's darker shades first."""
    shades = [colormaps["tab20"].colors[start::2] for start in (0, 1)]
    shades += [colormaps[name].colors[start::4] for name in ("tab20b", "tab20c") for start in (0, 2, 1, 3)]
    return [tuple(float(c) for c in colour[:3]) for group in shades for colour in group]  # type: ignore[misc]


def term_colour(term: str) -> tuple[int, int, int]:
    """A colour of its own for ``term`` as 8-bit RGB, the same in every DICOM result (SEG, RT Structure Set):
    :func:`qualitative_palette`'s colour at the hash of its name, so it does not depend on the other prompts."""
    palette = qualitative_palette()
    colour = palette[int.from_bytes(hashlib.sha256(term.encode()).digest()[:4], "big") % len(palette)]
    red, green, blue = (round(255 * channel) for channel in colour)
    return red, green, blue


def _label_colours(labels: Mapping[int, str]) -> dict[int, tuple[float, float, float]]:
    """A distinct RGB per label value, fixed by the value's rank among all label values.

    Neighbouring ranks ("left putamen", "right putamen") get different hues: matplotlib's qualitative tab20,
    tab20b and tab20c, each hue's darker shades first, give 60 colours; beyond that, turbo.
    """
    values = sorted(labels)
    palette = qualitative_palette()
    if len(values) > len(palette):
        palette = list(colormaps["turbo"](np.linspace(0.0, 1.0, len(values))))
    return {value: tuple(float(c) for c in palette[rank][:3]) for rank, value in enumerate(values)}
