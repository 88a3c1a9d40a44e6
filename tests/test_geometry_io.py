"""Reading NIfTI and DICOM volumes, and rejecting unusable ones with one-line errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import COL_COSINE, ORIGIN, PIXEL_SPACING, ROW_COSINE, SLICE_GAP, distinct_hu, write_series

from satseg.errors import SatInputError
from satseg.geometry import Volume, load_dicom_series, load_nifti, load_volume, validate_volume

OBLIQUE = np.array(
    [
        [0.0, -0.8, 0.3, 12.5],
        [0.9, 0.0, 0.0, -40.0],
        [0.0, 0.3, 2.9, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = OBLIQUE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _save_with_header(path: Path, array: np.ndarray, edit: dict[str, object]) -> Path:
    """A NIfTI whose header fields are set as given (no affine update on save)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    for key, value in edit.items():
        header[key] = value
    nib.save(nib.Nifti1Image(array, None, header), path)
    return path


def _error(call, *args: object) -> str:
    with pytest.raises(SatInputError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_nifti_round_trip_keeps_int16_and_affine(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    volume = load_volume(_save_nifti(tmp_path / "ct.nii.gz", array))
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, OBLIQUE, atol=1e-6)
    assert volume.modality is None


def test_nifti_float64_becomes_float32(tmp_path: Path) -> None:
    array = np.linspace(0, 1, 60).reshape(3, 4, 5)
    volume = load_nifti(_save_nifti(tmp_path / "mr.nii", array))
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, array, rtol=1e-6)


def test_trailing_singleton_axis_is_squeezed(tmp_path: Path) -> None:
    array = np.ones((4, 5, 6, 1), dtype=np.float32)
    assert load_volume(_save_nifti(tmp_path / "v.nii.gz", array)).shape == (4, 5, 6)


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((8, 9), ["2D", "shape 8x9", "3D volume is required"]),
        ((4, 5, 6, 3), ["4D", "shape 4x5x6x3", "split the series"]),
        ((8, 9, 1), ["single voxel", "8x9x1", "at least 2"]),
    ],
)
def test_wrong_dimensionality_is_rejected(tmp_path: Path, shape: tuple[int, ...], words: list[str]) -> None:
    message = _error(load_volume, _save_nifti(tmp_path / "v.nii.gz", np.zeros(shape, np.float32)))
    assert all(word in message for word in words), message


def test_nan_and_inf_are_counted(tmp_path: Path) -> None:
    array = np.zeros((4, 5, 6), np.float32)
    array[0, 0, :2] = np.nan
    array[1, 1, 1] = -np.inf
    message = _error(load_volume, _save_nifti(tmp_path / "v.nii.gz", array))
    assert "2 NaN" in message and "1 infinite" in message and "finite values" in message


@pytest.mark.parametrize("qform_code", [0, 1])
def test_zero_pixdim_gives_the_spacing_message(tmp_path: Path, qform_code: int) -> None:
    # nibabel reads pixdim 0 as 1 mm (and fixes it on save), so patch the stored header bytes.
    path = _save_nifti(tmp_path / "v.nii", np.zeros((4, 5, 6), np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    data = bytearray(path.read_bytes())
    data[84:88] = np.float32(0).tobytes()  # pixdim[2]
    data[252:256] = np.array([qform_code, 0], dtype=np.int16).tobytes()  # qform_code, sform_code
    path.write_bytes(bytes(data))
    message = _error(load_volume, path)
    assert "voxel spacing 1x0x2 mm" in message and "0.01 to 100 mm" in message


def test_zero_sform_column_gives_the_spacing_message(tmp_path: Path) -> None:
    srow = {"sform_code": 2, "srow_x": [1, 0, 0, 0], "srow_y": [0, 0, 0, 0], "srow_z": [0, 0, 1, 0]}
    message = _error(load_volume, _save_with_header(tmp_path / "v.nii", np.zeros((4, 5, 6), np.int16), srow))
    assert "voxel spacing 1x0x1 mm" in message


def test_absurd_spacing_is_rejected(tmp_path: Path) -> None:
    path = _save_nifti(tmp_path / "v.nii.gz", np.zeros((4, 5, 6), np.int16), np.diag([1.0, 500.0, 1.0, 1.0]))
    assert "voxel spacing 1x500x1 mm" in _error(load_volume, path)


def test_singular_affine_is_rejected(tmp_path: Path) -> None:
    srow = {"sform_code": 2, "srow_x": [1, 0, 1, 0], "srow_y": [0, 1, 1, 0], "srow_z": [1, 1, 2, 0]}
    message = _error(load_volume, _save_with_header(tmp_path / "v.nii", np.zeros((4, 5, 6), np.int16), srow))
    assert "singular" in message


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_nifti_gives_one_line(tmp_path: Path, keep: float) -> None:
    rng = np.random.default_rng(0)
    whole = _save_nifti(tmp_path / "whole.nii.gz", rng.normal(size=(40, 40, 30)).astype(np.float32))
    data = whole.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: int(len(data) * keep)])
    message = _error(load_volume, cut)
    assert "could not read NIfTI 'cut.nii.gz'" in message and "truncated or corrupt" in message


def test_unsupported_and_missing_paths(tmp_path: Path) -> None:
    other = tmp_path / "scan.mha"
    other.write_bytes(b"x")
    assert ".nii.gz file or a folder holding one DICOM series" in _error(load_volume, other)
    assert "no such file or folder" in _error(load_volume, tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, object])
def test_non_real_dtypes_are_rejected(dtype: type) -> None:
    volume = Volume(np.zeros((3, 3, 3), dtype=dtype), np.eye(4))
    assert "real integer or float" in _error(validate_volume, volume)


def test_too_many_voxels_and_bad_affine() -> None:
    assert "at most 10 are accepted" in _error(
        lambda: validate_volume(Volume(np.zeros((3, 3, 3)), np.eye(4)), max_voxels=10)
    )
    bad = np.eye(4)
    bad[0, 3] = np.nan
    assert "not a finite 4x4" in _error(validate_volume, Volume(np.zeros((3, 3, 3)), bad))


# --- DICOM ---------------------------------------------------------------------------------------------


def test_dicom_series_values_and_affine(tmp_path: Path) -> None:
    hu = distinct_hu((6, 5, 4))
    write_series(tmp_path, hu)
    (tmp_path / "notes.txt").write_text("not DICOM")
    volume = load_volume(tmp_path)
    assert volume.array.dtype == np.int16 and volume.modality == "ct"
    np.testing.assert_array_equal(volume.array, hu)
    for i, j, k in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (2, 3, 3), (5, 4, 3)]:
        lps = ORIGIN + k * SLICE_GAP * np.cross(ROW_COSINE, COL_COSINE)
        lps = lps + i * PIXEL_SPACING[1] * ROW_COSINE + j * PIXEL_SPACING[0] * COL_COSINE
        np.testing.assert_allclose(volume.affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)


def test_dicom_float_rescale_gives_float32(tmp_path: Path) -> None:
    write_series(tmp_path, np.full((4, 4, 3), 10.0), slope=0.5, intercept=0.25, modality="PT")
    volume = load_dicom_series(tmp_path)
    assert volume.array.dtype == np.float32 and volume.modality == "pet"
    np.testing.assert_allclose(volume.array, 10.25)


def test_dicom_missing_middle_slice(tmp_path: Path) -> None:
    write_series(tmp_path, distinct_hu((4, 4, 5)), slices=[0, 1, 3, 4])
    message = _error(load_volume, tmp_path)
    assert "gap" in message and "from 2 to 4 mm" in message and "missing slice" in message


def test_dicom_two_series(tmp_path: Path) -> None:
    write_series(tmp_path, distinct_hu((4, 4, 3)))
    write_series(tmp_path, distinct_hu((4, 4, 3)))
    assert "holds 2 DICOM series" in _error(load_volume, tmp_path)


def test_folder_without_slices(tmp_path: Path) -> None:
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 10)
    assert "no DICOM image slices" in _error(load_volume, tmp_path)
