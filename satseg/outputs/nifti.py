"""NIfTI masks and label maps on the input grid, with label names in a header extension."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from satseg.atomic import atomic_file
from satseg.errors import SatInputError

GENERATED_BY = "satseg"
DISCLAIMER = "AI-generated, not for clinical use"
_COMMENT_EXTENSION = 6  # NIfTI-1 extension code "comment"
_SCANNER = 1  # NIfTI xform code "scanner-based anatomical coordinates"


def write_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: Path,
    *,
    labels: Mapping[int, str] | None = None,
) -> Path:
    """Write a mask or label map as ``.nii.gz`` on exactly the grid of ``affine``.

    The affine goes into both sform and qform with code 1 (scanner). The sform is
    authoritative: it holds any affine (to float32 precision), while the qform drops
    shear. The data are stored unscaled (slope 1, intercept 0) in ``array``'s dtype.
    A "comment" header extension (code 6) holds JSON
    ``{"labels": {"1": "liver"}, "generated_by": "satseg", "note": "AI-generated, ..."}``.

    Args:
        array: ``[I, J, K]`` bool or uint8 (binary mask, stored as uint8) or uint16 (label map).
        affine: ``[4, 4]`` voxel-to-RAS+ millimetres, finite.
        path: target file, ending in ``.nii.gz``; written atomically.
        labels: names of the label values, each in ``1..dtype max``; none by default.

    Returns:
        ``path``.
    """
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise SatInputError(f"NIfTI output file names must end in .nii.gz, got {path.name}")
    if array.ndim != 3:
        raise ValueError(f"expected a [I, J, K] array, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"masks must be bool/uint8 and label maps uint16, got {array.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    labels = dict(labels or {})
    top = np.iinfo(array.dtype).max
    if any(not 1 <= int(value) <= top for value in labels):
        raise ValueError(f"label values must be in 1..{top} for {array.dtype}, got {sorted(labels)}")

    content = {
        "labels": {str(int(value)): name for value, name in sorted(labels.items())},
        "generated_by": GENERATED_BY,
        "note": DISCLAIMER,
    }
    return save_nifti_exact(array, affine, path, comment=content)


def save_nifti_exact(
    array: np.ndarray,
    affine: np.ndarray,
    path: Path,
    *,
    comment: Mapping[str, object] | None = None,
    compresslevel: int = 6,
) -> Path:
    """Write ``array`` as ``.nii.gz`` with exactly ``affine`` (sform and qform, code 1), atomically.

    The data dtype is kept and unscaled (slope 1, intercept 0); ``comment`` goes into a JSON
    "comment" header extension. Equal inputs give byte-identical files. ``compresslevel`` 6, zlib's own default:
    on a speckled mask (random weights) level 9 took 22x as long (1.88 s against 0.09 s for 122x101x112), and on
    a smooth 512x512x300 organ the time is NumPy's transposed copy either way; level 6's files are 8-50% larger.
    """
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=_SCANNER)
    image.set_qform(affine, code=_SCANNER)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if comment is not None:
        extension = nib.nifti1.Nifti1Extension(_COMMENT_EXTENSION, json.dumps(comment).encode())
        image.header.extensions.append(extension)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # filename: the gzip header names the final file, not the temporary one;
    # mtime 0: equal outputs are byte-identical.
    with (
        atomic_file(Path(path)) as file,
        gzip.GzipFile(Path(path).name, "wb", compresslevel, file, mtime=0) as gz,
    ):
        image.to_stream(gz)
    return Path(path)


def read_label_extension(path: Path) -> dict[int, str]:
    """Label names stored by :func:`write_nifti`, ``{value: name}``; empty if the file has none."""
    for extension in nib.load(path).header.extensions:
        if extension.get_code() != _COMMENT_EXTENSION:
            continue
        try:
            content = json.loads(extension.get_content())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # another tool's free-text comment
        if isinstance(content, dict) and content.get("generated_by") == GENERATED_BY:
            return {int(value): str(name) for value, name in content.get("labels", {}).items()}
    return {}
