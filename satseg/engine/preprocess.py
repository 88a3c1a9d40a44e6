"""SAT's inference preprocessing (reorient, resample, crop, normalise) and its exact inverse for predictions.

Convention: an affine maps voxel indices to the voxel CENTRE (NIfTI), so a grid of ``n`` voxels spans
indices ``[-0.5, n - 0.5]``. The model grid keeps the input's (possibly oblique) direction cosines, its
axes follow ``PreprocessConfig.orientation`` and its voxels are exactly ``target_spacing``; it is centred
on the input's field of view. One ``[4, 4]`` index map (model grid voxel -> input voxel: a signed
permutation times a per-axis scale, plus a shift) drives both directions, so forward and inverse agree.

MONAI's Spacing / Orientation inverses are not used: they resample through a full-resolution sampling
grid (measured 4.3 GB and 9 s per prompt for a 512x512x300 input on 2 cores). The map above is
axis-aligned, so trilinear resampling is done as three 1D linear passes instead (0.5 GB, under 2 s).

MONAI is not imported here at all: ``import monai`` loads every MONAI module (3.8 s, 12% of a demo CT run on 2
cores), so its percentile and bounding box are re-stated in a few lines; tests check them against MONAI's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from satseg.errors import SatInputError
from satseg.geometry.volume import Volume, check_modality
from satseg.spec import DEFAULT_PREPROCESS, PreprocessConfig, WindowSpec
from satseg.window.steps import economical_span

_CHUNK_VOXELS = 1 << 22  # 16 MB of float32 temporaries per chunk in the 1D passes
_TORCH_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)


@dataclass(frozen=True)
class PreparedVolume:
    """A volume on the model grid, with what is needed to bring predictions back to the input grid.

    Attributes:
        image: ``[H, W, D]`` float32 normalised intensities on the model grid (z-score, so mostly about
            -3..3): reoriented, resampled to ``target_spacing`` and cropped.
        affine: ``[4, 4]`` float64 model voxel -> RAS+ world mm: voxel ``(h, w, d)`` of ``image`` has its
            centre at ``affine @ (h, w, d, 1)``.
        input_shape: ``(I, J, K)`` of the input volume.
        grid_shape: shape of the model grid before cropping.
        crop_start: index in the uncropped model grid of ``image[0, 0, 0]``.
        input_to_grid: ``[4, 4]`` input voxel index -> uncropped model grid voxel index.
    """

    image: torch.Tensor
    affine: np.ndarray
    input_shape: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    input_to_grid: np.ndarray

    def to_input_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Bring one prompt's values on the model grid back to the input grid.

        Un-crops with zeros, resamples (trilinear) to the reoriented input grid and undoes the
        reorientation, as three 1D interpolations (transient memory about twice the output).

        Args:
            values: ``[H, W, D]`` (``image.shape``) float values, e.g. probabilities in [0, 1]; any device.

        Returns:
            ``[I, J, K]`` float32 on the CPU, in the input's voxel order; same value range as ``values``.
        """
        if tuple(values.shape) != tuple(self.image.shape):
            raise ValueError(f"values have shape {tuple(values.shape)}; expected {tuple(self.image.shape)}")
        values = values.detach().to(device="cpu", dtype=torch.float32)
        pad: list[int] = []
        for axis in reversed(range(3)):  # F.pad lists the last axis first
            before = self.crop_start[axis]
            pad += [before, self.grid_shape[axis] - before - values.shape[axis]]
        return _resample(F.pad(values, pad), self.input_to_grid, self.input_shape)

    def labels_to_grid(self, labels: np.ndarray) -> np.ndarray:
        """Put a label map of the input grid onto the cropped model grid, voxel for voxel with ``image``.

        Nearest neighbour through the same index map as ``image`` (``input_to_grid``, ``crop_start``), so
        no new label values appear. Like the image, model voxels beyond the outermost input voxel centres
        (the grid overhangs by under half a model voxel) take the edge value.

        Args:
            labels: ``[I, J, K]`` (``input_shape``) label values, any integer dtype, each in 0..65535.

        Returns:
            ``[H, W, D]`` (``image.shape``) uint16 label values from ``labels``.

        Raises:
            ValueError: ``labels`` has another shape or a non-integer dtype.
            SatInputError: a label value is outside 0..65535.
        """
        if tuple(labels.shape) != self.input_shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {self.input_shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) > np.iinfo(np.uint16).max):
            raise SatInputError(
                f"label values span {int(labels.min())}..{int(labels.max())}; label maps must hold 0..65535"
            )
        grid_to_input = np.linalg.inv(self.input_to_grid)
        linear = grid_to_input[:3, :3]
        output_axis = np.abs(linear).argmax(axis=1)  # the model axis along which each input axis runs
        indices = []
        for q in range(3):
            p = output_axis[q]
            grid_index = self.crop_start[p] + np.arange(self.image.shape[p])
            positions = linear[q, p] * grid_index + grid_to_input[q, 3]
            # floor(x + 0.5), not np.rint: round half to even would pick neighbours unevenly along the axis.
            indices.append(np.clip(np.floor(positions + 0.5), 0, self.input_shape[q] - 1).astype(np.intp))
        picked = labels[np.ix_(*indices)]  # axes in input order, each as long as its model axis
        return np.ascontiguousarray(picked.transpose(np.argsort(output_axis)), dtype=np.uint16)


def prepare(
    volume: Volume, modality: str, config: PreprocessConfig = DEFAULT_PREPROCESS, window: WindowSpec | None = None
) -> PreparedVolume:
    """Put a volume on the model grid: reorient, resample (trilinear), crop the foreground, normalise.

    Args:
        volume: a volume checked by :func:`satseg.geometry.validate_volume` (as ``load_volume`` returns).
        modality: one of :data:`MODALITIES`; selects the foreground threshold and the normalisation.
        config: target grid, cropping and intensity normalisation (the model spec's).
        window: the model spec's sliding window, for inference: with ``trim_margin`` the crop margin is trimmed
            where it would cost a window (:func:`~satseg.window.steps.economical_span`). ``None`` (training
            patches) keeps the whole margin.

    Returns:
        The :class:`PreparedVolume`; ``to_input_grid`` maps predictions back to ``volume``'s grid.
    """
    modality = check_modality(modality)
    grid_to_input, grid_shape = _grid_to_input(volume.affine, volume.shape, config)
    grid = _resample(_as_tensor(volume.array), grid_to_input, grid_shape)
    whole: Box = ((0, 0, 0), grid_shape)
    margin_box, (start, stop) = _crop_boxes(grid, modality, config, window) if config.crop_foreground else (whole,) * 2
    # The statistics come from the whole margin box, as in training (which never trims): trimming where it
    # saves a window moves no intensity.
    image = normalize_intensity(_cut(grid, margin_box), modality, config)
    del grid  # the unnormalised grid is no longer needed; normalize_intensity returned a new tensor
    if (start, stop) != margin_box:
        offset = margin_box[0]
        inner = (
            tuple(a - o for a, o in zip(start, offset, strict=True)),
            tuple(b - o for b, o in zip(stop, offset, strict=True)),
        )
        image = _cut(image, inner).clone()  # type: ignore[arg-type]
    crop_to_grid = np.eye(4)
    crop_to_grid[:3, 3] = start
    return PreparedVolume(
        image=image,
        affine=np.asarray(volume.affine, dtype=np.float64) @ grid_to_input @ crop_to_grid,
        input_shape=volume.shape,
        grid_shape=grid_shape,
        crop_start=start,
        input_to_grid=np.linalg.inv(grid_to_input),
    )


def normalize_intensity(
    image: torch.Tensor, modality: str, config: PreprocessConfig = DEFAULT_PREPROCESS
) -> torch.Tensor:
    """SAT's intensity normalisation: clip, then z-score over the whole image.

    CT is clipped to ``config.ct_window_hu``; MRI, PET and US to the ``config.percentiles`` of the image.
    A constant image gives zeros (the std of 0 is replaced by 1).

    Args:
        image: any shape, any real dtype (HU for CT).
        modality: one of :data:`MODALITIES`.
        config: the model spec's preprocessing.

    Returns:
        A new float32 tensor of the same shape, mean 0 and std 1 (unless constant).
    """
    modality = check_modality(modality)
    image = image.to(torch.float32)
    if modality == "ct":
        low, high = config.ct_window_hu
    else:
        low, high = intensity_percentiles(image, config.percentiles)
    clipped = image.clamp(low, high)
    # By hand rather than MONAI's NormalizeIntensity, which returns a MetaTensor under global track_meta.
    std = float(clipped.std(correction=0))
    return clipped.sub_(clipped.mean()).div_(std if std > 0 else 1.0)


def intensity_percentiles(image: torch.Tensor, percentiles: tuple[float, ...]) -> tuple[float, ...]:
    """``percentiles`` (0-100, linear interpolation) of ``image``'s values, exactly as MONAI's ``percentile``:
    numpy above 1M values (torch.quantile refuses more than 16M), torch.quantile in the image's dtype below."""
    fractions = np.asarray(percentiles, dtype=np.float64)
    if image.numel() > 1_000_000:
        return tuple(float(value) for value in torch.as_tensor(np.percentile(image.cpu().numpy(), fractions)).to(image))
    return tuple(float(value) for value in torch.quantile(image, torch.as_tensor(fractions / 100.0).to(image)))


def _grid_to_input(
    affine: np.ndarray, shape: tuple[int, int, int], config: PreprocessConfig
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The uncropped model grid: ``[4, 4]`` map from its voxel indices to input voxel indices, and its shape.

    Its axes follow ``config.orientation`` (nibabel picks the input axis nearest to each), keep the input's
    direction cosines and are exactly ``config.target_spacing`` apart; the grid is centred on the input's
    field of view, so rounding its size changes both ends alike.
    """
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(config.orientation)))
    oriented_to_input = inv_ornt_aff(ornt, shape)  # lossless: a signed axis permutation
    oriented_shape = np.asarray(shape)[np.argsort(ornt[:, 0])]
    oriented_spacing = np.linalg.norm(affine[:3, :3] @ oriented_to_input[:3, :3], axis=0)
    step = np.asarray(config.target_spacing) / oriented_spacing  # model voxel size in oriented voxels
    grid_shape = np.maximum(1, np.round(oriented_shape / step)).astype(int)
    grid_to_oriented = np.diag([*step, 1.0])
    grid_to_oriented[:3, 3] = (oriented_shape - 1) / 2 - step * (grid_shape - 1) / 2
    return oriented_to_input @ grid_to_oriented, (int(grid_shape[0]), int(grid_shape[1]), int(grid_shape[2]))


Box = tuple[tuple[int, int, int], tuple[int, int, int]]
"""Start and stop (exclusive) of a box in a ``[H, W, D]`` grid."""


def _cut(image: torch.Tensor, box: Box) -> torch.Tensor:
    (start, stop) = box
    return image[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]


def _crop_boxes(
    grid: torch.Tensor, modality: str, config: PreprocessConfig, window: WindowSpec | None
) -> tuple[Box, Box]:
    """The foreground box of ``grid`` plus the crop margin (clipped to the grid), and that box trimmed by
    ``window``'s rule (the same box without a window or ``trim_margin``)."""
    (core_start, core_stop) = _foreground_box(grid, modality, config)
    margin = [math.ceil(config.crop_margin_mm / s) for s in config.target_spacing]
    spans, trimmed = [], []
    for axis in range(3):
        core = (core_start[axis], core_stop[axis])
        box = (max(core[0] - margin[axis], 0), min(core[1] + margin[axis], grid.shape[axis]))
        spans.append(box)
        if window is not None and window.trim_margin:
            box = economical_span(core, box, window.patch_size[axis], window.overlap)
        trimmed.append(box)
    return tuple(_as_box(boxes) for boxes in (spans, trimmed))  # type: ignore[return-value]


def _as_box(spans: list[tuple[int, int]]) -> Box:
    return (spans[0][0], spans[1][0], spans[2][0]), (spans[0][1], spans[1][1], spans[2][1])


def _foreground_box(grid: torch.Tensor, modality: str, config: PreprocessConfig) -> Box:
    """The bounding box of the foreground of ``grid`` [H, W, D]: CT > ``config.ct_foreground_hu``, other
    modalities > ``config.foreground_above``; no foreground gives the whole grid."""
    threshold = config.ct_foreground_hu if modality == "ct" else config.foreground_above
    foreground = grid > threshold
    if not foreground.any():
        return (0, 0, 0), (grid.shape[0], grid.shape[1], grid.shape[2])
    spans = []
    for axis in range(3):
        present = foreground.any(dim=[other for other in range(3) if other != axis]).nonzero()[:, 0]
        spans.append((int(present[0]), int(present[-1]) + 1))
    return _as_box(spans)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``array``'s memory where torch can, else a float32 copy."""
    if array.dtype.type not in _TORCH_DTYPES or not array.dtype.isnative or min(array.strides) < 0:
        array = array.astype(np.float32)
    return torch.from_numpy(array)


def _resample(source: torch.Tensor, out_to_source: np.ndarray, out_shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of ``source`` [A, B, C] (any real dtype) onto a float32 ``out_shape`` grid.

    ``out_to_source`` [4, 4] maps output voxel indices to source voxel indices and must be axis-aligned
    (a signed permutation times a per-axis scale, plus a shift), so the resampling is three 1D passes.
    Positions beyond the outermost source voxel centres take the edge value.
    """
    linear = out_to_source[:3, :3]
    output_axis = np.abs(linear).argmax(axis=1)  # the output axis along which each source axis runs
    # Pass over the source in its memory order (NIfTI and DICOM arrays are Fortran-ordered): the 1D
    # passes are several times faster along contiguous rows. The result is permuted to output order last.
    memory_order = sorted(range(3), key=source.stride, reverse=True)
    x = source.permute(*memory_order)
    ratio = [out_shape[output_axis[q]] / source.shape[q] for q in memory_order]
    for axis in sorted(range(3), key=ratio.__getitem__):  # shrinking first keeps intermediates small
        q = memory_order[axis]
        p = output_axis[q]
        positions = linear[q, p] * np.arange(out_shape[p]) + out_to_source[q, 3]
        x = _resample_axis(x, axis, positions)
    return x.permute(*np.argsort(output_axis[memory_order]).tolist()).contiguous()


def _resample_axis(x: torch.Tensor, axis: int, positions: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``x`` [A, B, C] along ``axis`` at ``positions`` (float voxel indices).

    Returns float32 with ``len(positions)`` voxels along ``axis``; positions are clamped to the first and
    last voxel. Works in chunks along another axis so temporaries stay about 2 x 16 MB.
    """
    n = x.shape[axis]
    positions = np.clip(positions, 0, n - 1)
    lower = np.minimum(np.floor(positions), max(n - 2, 0)).astype(np.int64)
    upper = np.minimum(lower + 1, n - 1)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = -1
    weight = torch.from_numpy((positions - lower).astype(np.float32)).view(weight_shape)
    lower_t, upper_t = torch.from_numpy(lower), torch.from_numpy(upper)
    out_shape = list(x.shape)
    out_shape[axis] = len(positions)
    out = torch.empty(out_shape, dtype=torch.float32)
    chunk_axis = 1 if axis == 0 else 0
    chunk = max(1, _CHUNK_VOXELS * out_shape[chunk_axis] // out.numel())
    along = (slice(None),) * axis
    for begin in range(0, out_shape[chunk_axis], chunk):
        length = min(chunk, out_shape[chunk_axis] - begin)
        part, out_part = x.narrow(chunk_axis, begin, length), out.narrow(chunk_axis, begin, length)
        # Indexing rather than index_select: on a busy CPU, index_select's threads stall for ~1 s per call.
        out_part.copy_(part[(*along, lower_t)])
        out_part.lerp_(part[(*along, upper_t)].to(torch.float32), weight)
    return out
