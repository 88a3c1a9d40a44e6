"""Reading volumes from NIfTI files and DICOM series, and checking that they are usable 3D images."""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.pixels
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

from satseg.contract import DEFAULT_MAX_VOXELS
from satseg.errors import SatInputError, one_line
from satseg.geometry.volume import Volume

ACCEPTED_INPUT = "a .nii / .nii.gz file or a folder holding one DICOM series"
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 100.0

MAX_DEFLATE_RATIO = 1032
"""Deflate cannot expand data by more than about 1032:1, so a .gz declaring more than this lies about its size."""
MAX_IMAGE_EXPANSION = 100
"""A compressed image over :data:`EXPANSION_CHECKED_FROM` bytes may expand this many times at most. Real CT and MR
compress 2-10:1; one that expands 1000-fold is nearly constant, a decompression bomb (a 0.5 MB file of a
512x512x1000 CT made sat-segment peak at 3.8 GB)."""
EXPANSION_CHECKED_FROM = 64 << 20
_READ_CHUNK = 1 << 20
GZIP_WBITS = 16 + zlib.MAX_WBITS
"""zlib's setting for a gzip header and trailer around the deflate stream."""
CT_PLAUSIBLE_HU = (-4096.0, 32767.0)
"""CT values outside this are not Hounsfield units (stored values with no rescale applied, say)."""
CT_MIN_RANGE_HU = 50.0
"""A CT spanning less than this has no air-to-tissue contrast: most likely an already normalised image."""

_DICOM_MODALITIES: dict[str, str] = {"CT": "ct", "MR": "mri", "PT": "pet", "US": "us"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_volume(path: str | os.PathLike[str], max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a NIfTI file or a folder holding one DICOM series, and check it with :func:`validate_volume`.

    The header's declared shape, dtype and byte count are checked against ``max_voxels`` and the file's real
    size before any voxel is read, so a small file that declares a huge image is refused, not allocated.

    Returns:
        A :class:`Volume` with a 3D array ``[I, J, K]`` and a voxel -> RAS+ mm affine.

    Raises:
        SatInputError: the path is missing or of another kind, unreadable, or not a usable 3D image.
    """
    path = Path(path)
    if path.is_dir():
        volume = load_dicom_series(path, max_voxels)
    elif path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        volume = load_nifti(path, max_voxels)
    elif not path.exists():
        raise SatInputError(f"no such file or folder: {path}; expected {ACCEPTED_INPUT}")
    else:
        raise SatInputError(f"unsupported input {path.name!r}: expected {ACCEPTED_INPUT}")
    return validate_volume(volume, max_voxels=max_voxels)


def load_nifti(path: str | os.PathLike[str], max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file with nibabel (not validated: see :func:`validate_volume`).

    The affine is nibabel's ``img.affine`` (sform if set, else qform, else pixdim). The array keeps its
    stored dtype (int16 CT stays int16); scaled data (scl_slope) and float64 come back as float32.

    Raises:
        SatInputError: the header declares more than ``max_voxels`` voxels or more bytes than the file holds
            (checked before any voxel is read), or the file is truncated or corrupt.
    """
    path = Path(path)
    with _unreadable_nifti(path):
        img = nib.load(path)  # the header only: nibabel reads voxels lazily
    check_declared_size(path, img.header, max_voxels)
    with _unreadable_nifti(path):
        # Force the read here so a truncated file fails inside this block.
        array = np.asanyarray(img.dataobj)
        zero_pixdim_axes = _zero_pixdim_axes(path, img)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    affine = np.array(img.affine, dtype=np.float64)
    affine[:, zero_pixdim_axes] = 0.0  # so validate_volume reports the zero spacing
    return Volume(array=array, affine=affine, modality=None)


@contextmanager
def _unreadable_nifti(path: Path) -> Iterator[None]:
    """Turn nibabel's and zlib's read errors into one SatInputError line."""
    try:
        yield
    except (ImageFileError, HeaderDataError, EOFError, OSError, zlib.error, ValueError) as error:
        reason = one_line(str(error))
        raise SatInputError(f"could not read NIfTI {path.name!r}: file is truncated or corrupt ({reason})") from error


def check_declared_size(path: Path, header: nib.Nifti1Header, max_voxels: int) -> None:
    """Refuse a NIfTI header that declares more voxels than ``max_voxels`` or more bytes than ``path`` holds.

    Runs before nibabel allocates the array (it zero-fills what a short file lacks): an uncompressed file must
    be at least ``vox_offset`` + the voxel bytes long; a ``.gz`` must decompress to at least that, which is
    counted by streaming (1 MiB of memory), after a refusal of any claim beyond what deflate can expand to.
    """
    shape = tuple(int(size) for size in header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.int64))
    declared = "x".join(map(str, shape))
    if voxels > max_voxels:
        raise SatInputError(
            f"NIfTI {path.name!r} declares {voxels} voxels (shape {declared}); at most {max_voxels} are accepted"
        )
    needed = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        holds = f"{size} bytes" if size < needed else ""
    elif needed > MAX_DEFLATE_RATIO * size:
        holds = f"{size} compressed bytes, at most {MAX_DEFLATE_RATIO * size} decompressed"
    elif needed >= EXPANSION_CHECKED_FROM and needed > MAX_IMAGE_EXPANSION * size:
        raise SatInputError(
            f"NIfTI {path.name!r} would expand {needed // size}-fold ({size} bytes to {needed}): an image that "
            f"compressible is nearly constant (a decompression bomb?); images over {EXPANSION_CHECKED_FROM >> 20} MiB "
            f"may expand at most {MAX_IMAGE_EXPANSION}-fold"
        )
    else:
        decompressed = _decompressed_size(path, limit=needed)
        holds = f"{decompressed} decompressed bytes" if decompressed < needed else ""
    if holds:
        raise SatInputError(
            f"could not read NIfTI {path.name!r}: file is truncated (its header declares shape {declared}, "
            f"{needed} bytes with the header, but the file holds {holds}); a complete NIfTI file is required"
        )


def _decompressed_size(path: Path, limit: int) -> int:
    """Bytes that ``path`` (gzip, any number of members) decompresses to, counted up to ``limit`` without holding
    them. A cut or corrupt stream counts what came out before the damage: zlib is fed chunk by chunk because
    ``gzip``'s reader drops the whole chunk it was reading when the stream ends early."""
    count = 0
    inflater = zlib.decompressobj(wbits=GZIP_WBITS)
    with path.open("rb") as raw:
        while count < limit and (compressed := raw.read(_READ_CHUNK)):
            while compressed and count < limit:
                try:
                    count += len(inflater.decompress(compressed, _READ_CHUNK))  # at most a chunk out at a time
                except zlib.error:
                    return count
                if inflater.eof:  # the next gzip member, if any, starts in what is left
                    compressed = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=GZIP_WBITS)
                else:
                    compressed = inflater.unconsumed_tail
    return count


def _zero_pixdim_axes(path: Path, img: nib.Nifti1Image) -> list[int]:
    """Spatial axes whose header pixdim is 0 where the affine comes from pixdim (no sform).

    nibabel's load silently turns pixdim 0 into 1 mm; re-read the header unchecked to see the stored value.
    """
    if img.header["sform_code"] > 0:
        return []
    with ImageOpener(path) as fileobj:
        raw = type(img.header).from_fileobj(fileobj, check=False)
    return [axis for axis in range(3) if raw["pixdim"][axis + 1] == 0]


def load_dicom_series(folder: str | os.PathLike[str], max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read the single-frame DICOM files of one series in ``folder`` with pydicom (not validated).

    Files that are not DICOM, or DICOM without an image plane (DICOMDIR, reports), are skipped.
    Slices are sorted along the slice normal (row cosine x column cosine) and must be evenly spaced.

    Returns:
        A :class:`Volume` whose array is ``[I, J, K]`` = [column (along the row direction),
        row (along the column direction), slice], so the affine columns are
        ``row cosine * PixelSpacing[1]``, ``column cosine * PixelSpacing[0]`` and the slice step
        vector, converted from DICOM's LPS to RAS+. Values are RescaleSlope * stored + RescaleIntercept:
        int16 when slope and intercept are integers and the result fits, else float32.

    Raises:
        SatInputError: no image slices, several series, multi-frame files, inconsistent slices,
            a gap or uneven spacing, more than ``max_voxels`` voxels or a slice file shorter than its declared
            pixels (both checked before any pixel is decoded), or pixel data that cannot be decoded.
    """
    headers = sorted_series_headers(folder)
    check_declared_pixels(headers, max_voxels)
    first = headers[0][1]
    row_cosine, col_cosine = np.reshape(np.asarray(first.ImageOrientationPatient, dtype=np.float64), (2, 3))
    positions = np.array([ds.ImagePositionPatient for _, ds in headers], dtype=np.float64)
    step = _slice_step(positions, np.cross(row_cosine, col_cosine))

    between_rows, between_columns = (float(v) for v in first.PixelSpacing)  # DICOM lists rows first
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * between_columns
    affine[:3, 1] = col_cosine * between_rows
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    array = _read_dicom_pixels([path for path, _ in headers], [ds for _, ds in headers])
    modality = _DICOM_MODALITIES.get(str(first.get("Modality", "")).upper())
    return Volume(array=array, affine=_LPS_TO_RAS @ affine, modality=modality)


def sorted_series_headers(folder: str | os.PathLike[str]) -> list[tuple[Path, pydicom.Dataset]]:
    """(path, header without pixels) of the one series in ``folder``, in the volume's slice order (index K of
    :func:`load_dicom_series`): sorted along the slice normal (row cosine x column cosine).

    Raises:
        SatInputError: no image slices, a geometry tag that is not a number, several series or frames of
            reference, multi-frame files, or slices of different size or plane.
    """
    folder = Path(folder)
    headers = _read_dicom_headers(folder)
    if not headers:
        raise SatInputError(
            f"no DICOM image slices in folder {folder}; expected the files of one series directly in it"
        )
    for path, ds in headers:
        check_geometry_tags(path, ds)
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise SatInputError(f"folder {folder} holds {len(series)} DICOM series; put each series in its own folder")
    frames = {str(ds.get("FrameOfReferenceUID", "")) for _, ds in headers}
    if len(frames) > 1:  # positions in two frames of reference cannot be put on one grid
        raise SatInputError(
            f"the slices of folder {folder} lie in {len(frames)} frames of reference; one series needs one"
        )
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in headers):
        raise SatInputError(
            "multi-frame (enhanced) DICOM is not supported; convert it to NIfTI first (e.g. with dcm2niix)"
        )
    first = headers[0][1]
    for _, ds in headers:
        same_plane = np.allclose(ds.ImageOrientationPatient, first.ImageOrientationPatient, atol=1e-4)
        if not same_plane or (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise SatInputError(
                "DICOM slices differ in size or orientation; one series with parallel slices is required"
            )
    row_cosine, col_cosine = np.reshape(np.asarray(first.ImageOrientationPatient, dtype=np.float64), (2, 3))
    positions = np.array([ds.ImagePositionPatient for _, ds in headers], dtype=np.float64)
    order = np.argsort(positions @ np.cross(row_cosine, col_cosine), kind="stable")
    return [headers[i] for i in order]


GEOMETRY_TAGS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2, "Rows": 1, "Columns": 1}
"""The tags that place a slice in the world, and how many numbers each holds."""


def check_geometry_tags(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse a slice whose geometry tags are not finite numbers (or not positive, for sizes), naming the file and
    the tag: such a slice can never be placed, so there is nothing to retry."""
    for tag, count in GEOMETRY_TAGS.items():
        try:
            raw = ds.get(tag)  # pydicom converts DS and IS values here, and raises on text that is no number
            values = [raw] if raw is None or isinstance(raw, (str, int, float)) else list(raw)
            numbers = [float(value) for value in values]
        except (TypeError, ValueError):
            item = ds.get_item(tag)
            value = item.value if item is not None else None
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            values, numbers = (text.split("\\") if isinstance(text, str) else list(text or [])), []
        finite = len(numbers) == count and all(np.isfinite(numbers))
        if not finite or (tag not in ("ImagePositionPatient", "ImageOrientationPatient") and min(numbers) <= 0):
            shown = "\\".join(str(value) for value in values)[:40]
            raise SatInputError(f"DICOM file {path.name!r}: {tag} is {shown!r}, not {count} valid number(s)")


def check_declared_pixels(headers: list[tuple[Path, pydicom.Dataset]], max_voxels: int) -> None:
    """Refuse a series whose headers declare more than ``max_voxels`` voxels, or (uncompressed) a file shorter
    than the pixel bytes its header declares, before anything is decoded or allocated."""
    first = headers[0][1]
    rows, columns = int(first.Rows), int(first.Columns)
    voxels = rows * columns * len(headers)
    if voxels > max_voxels:
        raise SatInputError(
            f"DICOM series declares {voxels} voxels ({len(headers)} slices of {rows}x{columns}); "
            f"at most {max_voxels} are accepted"
        )
    for path, ds in headers:
        frame = native_frame_bytes(ds)
        if frame is not None and path.stat().st_size < frame:
            raise SatInputError(
                f"DICOM file {path.name!r} declares {rows}x{columns} pixels ({frame} bytes) but holds "
                f"{path.stat().st_size} bytes; complete uncompressed or compressed slices are required"
            )


def native_frame_bytes(ds: pydicom.Dataset) -> int | None:
    """The bytes one frame's pixels take in ``ds``'s uncompressed transfer syntax, or ``None`` when they are
    compressed (no fixed size) or the header does not say."""
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_compressed or "Rows" not in ds:
        return None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return int(ds.Rows) * int(ds.get("Columns", 0)) * samples * (int(ds.get("BitsAllocated", 16)) // 8)


def pixel_data_shortfall(path: Path, ds: pydicom.Dataset) -> str | None:
    """Why the uncompressed Pixel Data of the file at ``path`` (``ds``: read with ``defer_size`` so that it is
    not loaded) cannot hold the frames its header declares, or ``None``. Costs no pixel read."""
    frame = native_frame_bytes(ds)
    if frame is None or "PixelData" not in ds:
        return None
    element = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is None:  # deferred: its length, and the file's
        held = min(element.length, path.stat().st_size - element.value_tell)
    else:
        held = len(ds.PixelData)
    needed = frame * int(ds.get("NumberOfFrames", 1) or 1)
    if held >= needed:
        return None
    return (
        f"its Pixel Data holds {held} bytes where {ds.Rows}x{ds.get('Columns')} pixels of "
        f"{ds.get('BitsAllocated')} bits need {needed}: the slice is truncated"
    )


def _read_dicom_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """(path, header without pixels) of the files in ``folder`` that are DICOM images with a plane."""
    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM (no preamble): a stray file
        except (EOFError, OSError, ValueError) as error:
            raise SatInputError(f"could not read DICOM file {path.name!r}: file is truncated or corrupt") from error
        if all(tag in ds for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows")):
            headers.append((path, ds))
    return headers


def _slice_step(positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The ``[3]`` mm vector from one slice to the next, from sorted ``[K, 3]`` ImagePositionPatient.

    Raises SatInputError for one slice, repeated positions, uneven spacing or positions off a line.
    """
    if len(positions) < 2:
        raise SatInputError("DICOM series has 1 slice; a 3D volume needs at least 2")
    gaps = np.diff(positions @ normal)
    tolerance = max(0.01, 0.01 * float(np.median(gaps)))
    if gaps.min() <= tolerance:
        raise SatInputError(
            "DICOM series has several slices at the same position (several acquisitions or echoes?); "
            "one image per position is required"
        )
    if gaps.max() - gaps.min() > tolerance:
        raise SatInputError(
            f"DICOM series has a gap: slice spacing varies from {gaps.min():.4g} to {gaps.max():.4g} mm "
            "(a missing slice?); evenly spaced slices are required"
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    on_line = positions[0] + np.arange(len(positions))[:, None] * step
    if np.abs(positions - on_line).max() > tolerance:
        raise SatInputError("DICOM slice positions do not lie on a line; one straight stack of slices is required")
    return step


def _read_dicom_pixels(paths: list[Path], headers: list[pydicom.Dataset]) -> np.ndarray:
    """``[I, J, K]`` rescaled pixel values of the sorted slices (see :func:`load_dicom_series`)."""
    first = _decode_slice(paths[0], headers[0])
    # Fortran order like nibabel's arrays: each slice is one contiguous block.
    stored = np.empty((first.shape[1], first.shape[0], len(paths)), dtype=first.dtype, order="F")
    for k, (path, ds) in enumerate(zip(paths, headers, strict=True)):
        # pixel_array is [row, column]; the volume is [column, row, slice]
        stored[:, :, k] = (first if k == 0 else _decode_slice(path, ds)).T
    slopes = np.array([float(ds.get("RescaleSlope", 1) or 1) for ds in headers])
    intercepts = np.array([float(ds.get("RescaleIntercept", 0) or 0) for ds in headers])
    # By hand rather than pydicom's apply_rescale, which returns float64: integral rescales stay int16 HU.
    if np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts)):
        values = stored.astype(np.int32) * slopes.astype(np.int32) + intercepts.astype(np.int32)
        info = np.iinfo(np.int16)
        if values.min() >= info.min and values.max() <= info.max:
            return values.astype(np.int16)
    return stored.astype(np.float32) * slopes.astype(np.float32) + intercepts.astype(np.float32)


def _decode_slice(path: Path, header: pydicom.Dataset) -> np.ndarray:
    """The ``[Rows, Columns]`` stored pixel values of one single-frame DICOM file."""
    try:
        return pydicom.pixels.pixel_array(path)
    except (NotImplementedError, RuntimeError, ValueError, OSError, EOFError) as error:
        syntax = header.file_meta.get("TransferSyntaxUID", "unknown")
        raise SatInputError(
            f"could not decode the pixel data of DICOM file {path.name!r} (transfer syntax {syntax}); "
            "uncompressed DICOM is accepted, or install pylibjpeg / gdcm for compressed files"
        ) from error


def validate_volume(volume: Volume, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Check that ``volume`` is one usable 3D image; drop trailing singleton axes (``[I, J, K, 1]``).

    Accepted: a real (integer or float) array with 3 axes of at least 2 voxels, at most ``max_voxels``
    voxels, finite values, and a finite invertible affine whose voxel spacing is 0.01 to 100 mm per axis.

    Returns:
        The volume, with its array squeezed to ``[I, J, K]`` where it had trailing size-1 axes.

    Raises:
        SatInputError: one line saying what was wrong and what is accepted.
    """
    array = volume.array
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    shape = "x".join(str(s) for s in array.shape)
    if array.ndim < 3:
        raise SatInputError(f"image is {array.ndim}D (shape {shape}); a 3D volume is required")
    if array.ndim > 3:
        raise SatInputError(
            f"image is {array.ndim}D (shape {shape}); one 3D volume is accepted — split the series first"
        )
    if min(array.shape) < 2:
        raise SatInputError(
            f"image has a single voxel along an axis (shape {shape}); "
            "a 3D volume with at least 2 voxels per axis is required"
        )
    if array.size > max_voxels:
        raise SatInputError(f"image has {array.size} voxels (shape {shape}); at most {max_voxels} are accepted")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise SatInputError(f"image has dtype {array.dtype}; real integer or float voxel values are accepted")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            raise SatInputError(
                f"image has {n_nan} NaN and {finite.size - int(finite.sum()) - n_nan} infinite voxel values; "
                "only finite values are accepted"
            )
    _check_affine(volume.affine)
    return dataclasses.replace(volume, array=array)


def _check_affine(affine: np.ndarray) -> None:
    """Raise SatInputError unless ``affine`` is a finite ``[4, 4]`` with sane spacing and invertible."""
    affine = np.asarray(affine)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise SatInputError("image affine is not a finite 4x4 matrix; a valid voxel-to-world affine is required")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not ((spacing >= MIN_SPACING_MM) & (spacing <= MAX_SPACING_MM)).all():
        found = "x".join(f"{s:.4g}" for s in spacing)
        raise SatInputError(
            f"voxel spacing {found} mm is not accepted; each axis must be {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm"
        )
    # Relative to the spacing: coplanar voxel axes give a (near-)zero volume per voxel.
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise SatInputError(
            "image affine is singular (its voxel axes are coplanar); a valid voxel-to-world affine is required"
        )


def check_intensities(array: np.ndarray, modality: str) -> None:
    """Refuse values that cannot be an image of ``modality``: a constant image (any modality), or a CT whose
    values cannot be Hounsfield units. Every entry point (CLI, client, server) calls this once the modality is
    known, so the same image is refused the same way everywhere.

    Raises:
        SatInputError: one line with the value range found and what is expected.
    """
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise SatInputError(f"image is constant (every voxel is {low:g}); an image with contrast is required")
    if modality == "ct" and (low < CT_PLAUSIBLE_HU[0] or high > CT_PLAUSIBLE_HU[1] or high - low < CT_MIN_RANGE_HU):
        raise SatInputError(
            f"CT values span {low:g} to {high:g}; Hounsfield units are expected (air about -1000, "
            f"bone up to a few thousand, within {CT_PLAUSIBLE_HU[0]:g} to {CT_PLAUSIBLE_HU[1]:g})"
        )
