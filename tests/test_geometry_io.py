"""Reading NIfTI and DICOM volumes, and rejecting unusable ones with one-line errors."""

from __future__ import annotations

import gzip
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import COL_COSINE, ORIGIN, PIXEL_SPACING, ROW_COSINE, SLICE_GAP, distinct_hu, write_series

from satseg.errors import SatInputError
from satseg.geometry import Volume, load_dicom_series, load_nifti, load_volume, validate_volume
from satseg.geometry.io import check_intensities
from satseg.geometry.volume import MODALITIES, choose_modality

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
    assert message.startswith("could not read NIfTI 'cut.nii.gz': file is truncated")


def test_a_cut_gzip_is_refused_with_the_bytes_it_really_holds(tmp_path: Path) -> None:
    """The cut lands inside the first MiB read: every byte decompressed before it is counted, not 0."""
    rng = np.random.default_rng(2)
    whole = _save_nifti(tmp_path / "whole.nii.gz", rng.integers(-1000, 1000, (64, 64, 64)).astype(np.int16))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    holds = len(inflater.decompress(cut.read_bytes()))  # what the cut file really decompresses to
    assert 0 < holds < 352 + 64**3 * 2
    assert f"but the file holds {holds} decompressed bytes)" in _error(load_volume, cut)


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


def test_a_series_mixing_two_frames_of_reference_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path, distinct_hu((4, 4, 4)))
    moved = sorted(tmp_path.iterdir())[0]
    dataset = pydicom.dcmread(moved)
    dataset.FrameOfReferenceUID = pydicom.uid.generate_uid()
    dataset.save_as(moved)
    message = _error(load_volume, tmp_path)
    assert "lie in 2 frames of reference" in message and len(message.splitlines()) == 1


@pytest.mark.parametrize(
    ("tag", "bad", "message"),
    [
        ("ImagePositionPatient", b"abc", "ImagePositionPatient is 'abc"),
        ("PixelSpacing", b"0.0", "PixelSpacing is '0.0"),
    ],
)
def test_a_geometry_tag_that_is_no_number_is_refused_naming_file_and_tag(
    tmp_path: Path, tag: str, bad: bytes, message: str
) -> None:
    """A slice whose position or spacing is not a number can never be placed: one line naming the file and the
    tag (it was ``could not convert string to float: 'abc'``, naming neither, and the node retried it)."""
    write_series(tmp_path, distinct_hu((8, 6, 3)))
    broken = sorted(tmp_path.iterdir())[1]
    raw = broken.read_bytes()
    text = bytes(pydicom.dcmread(broken).get_item(tag).value)
    assert raw.count(text) == 1
    broken.write_bytes(raw.replace(text, bad + text[len(bad) :]))  # same length: the file stays well-formed
    with pytest.raises(SatInputError, match=f"DICOM file '{broken.name}': {message}") as refused:
        load_volume(tmp_path)
    assert "\n" not in str(refused.value) and "valid number" in str(refused.value)


def test_folder_without_slices(tmp_path: Path) -> None:
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 10)
    assert "no DICOM image slices" in _error(load_volume, tmp_path)


# --- files that declare more than they hold (memory bombs) ------------------------------------------

BOMB_SHAPE = (2000, 2000, 2000)


def _header_only_nifti(path: Path, shape: tuple[int, ...], dtype: type = np.int16) -> Path:
    """A NIfTI of only its 352-byte header declaring ``shape`` (gzip-compressed for ``.gz``: about 90 bytes)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    raw = header.binaryblock + b"\0" * 4  # the 4 extension bytes before vox_offset 352
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _peak_rss_mb_loading(path: Path) -> tuple[str, float]:
    """(error message, peak RSS growth in MB over the imports) of load_volume(path) in a fresh child process."""
    code = (
        "import resource, sys\n"
        "from satseg.errors import SatInputError\n"
        "from satseg.geometry import load_volume\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    load_volume({str(path)!r}); message = 'loaded'\n"
        "except SatInputError as error:\n"
        "    message = str(error)\n"
        "print(message); print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    message, peak = done.stdout.strip().splitlines()
    return message, float(peak)


@pytest.mark.parametrize("name", ["bomb.nii.gz", "bomb.nii"])
def test_a_tiny_file_declaring_2000_cubed_is_refused_before_allocation(tmp_path: Path, name: str) -> None:
    """An 88-byte .nii.gz declaring 2000^3 int16 made nibabel zero-fill 16 GB (OOM kill, no message)."""
    bomb = _header_only_nifti(tmp_path / name, BOMB_SHAPE)
    assert bomb.stat().st_size < 400
    message, peak_mb = _peak_rss_mb_loading(bomb)
    assert "declares 8000000000 voxels" in message and "at most" in message
    assert peak_mb < 100


@pytest.mark.parametrize("name", ["short.nii.gz", "short.nii"])
def test_a_header_that_claims_more_bytes_than_the_file_holds_is_refused_unread(tmp_path: Path, name: str) -> None:
    """Under the voxel cap (200 M int16 voxels: 400 MB) but with no voxels behind the header."""
    short = _header_only_nifti(tmp_path / name, (1000, 1000, 200))
    message, peak_mb = _peak_rss_mb_loading(short)
    assert message.startswith(f"could not read NIfTI '{name}': file is truncated (its header declares shape")
    assert message.endswith("a complete NIfTI file is required")
    assert peak_mb < 100


def test_a_gzip_that_decompresses_short_is_counted_not_allocated(tmp_path: Path) -> None:
    """A .gz within deflate's expansion ratio of its claim, but whose stream ends early: counted by streaming."""
    rng = np.random.default_rng(1)
    whole = _save_nifti(tmp_path / "whole.nii", rng.integers(-1000, 1000, (64, 64, 64)).astype(np.int16))
    header = nib.load(whole).header.copy()
    header.set_data_shape((64, 64, 6400))  # 100x the data present
    raw = header.binaryblock + b"\0" * 4 + whole.read_bytes()[352:]
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw))
    message = _error(load_volume, tmp_path / "short.nii.gz")
    assert "is truncated" in message and "but the file holds 524640 decompressed bytes)" in message


def test_a_nearly_constant_image_that_expands_a_thousandfold_is_refused_unread(tmp_path: Path) -> None:
    """Honest about its size, but a 0.5 MB file of a 512x512x1000 CT made sat-segment peak at 3.8 GB."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((512, 512, 256))
    header.set_sform(np.eye(4), code=1)
    bomb = tmp_path / "air.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as stream:
        stream.write(header.binaryblock + b"\0" * 4)
        for _ in range(256):
            stream.write(b"\0" * (512 * 512 * 2))
    assert bomb.stat().st_size < 1_000_000
    message, peak_mb = _peak_rss_mb_loading(bomb)
    assert "would expand" in message and "a decompression bomb?" in message
    assert peak_mb < 100


def test_a_dicom_series_declaring_absurd_rows_and_columns_is_refused_before_decoding(tmp_path: Path) -> None:
    write_series(tmp_path / "s", distinct_hu((6, 5, 4)))
    for path in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = 60000, 60000
        ds.save_as(path)
    message = _error(load_volume, tmp_path / "s")
    assert "DICOM series declares 14400000000 voxels (4 slices of 60000x60000)" in message
    for path in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = 5000, 5000  # under the cap for 4 slices, but each file holds 60 bytes of pixels
        ds.save_as(path)
    message = _error(load_volume, tmp_path / "s")
    assert "declares 5000x5000 pixels (50000000 bytes) but holds" in message


# --- intensities and modality: the checks every entry point shares -----------------------------------


@pytest.mark.parametrize(
    ("array", "modality", "words"),
    [
        (np.zeros((4, 4, 4), np.int16), "ct", "image is constant (every voxel is 0)"),
        (np.full((4, 4, 4), 7.5, np.float32), "mri", "image is constant (every voxel is 7.5)"),
        (np.linspace(0, 0.71, 64, dtype=np.float32).reshape(4, 4, 4), "ct", "CT values span 0 to 0.71"),
        (np.linspace(0, 40000, 64, dtype=np.float32).reshape(4, 4, 4), "ct", "Hounsfield units are expected"),
    ],
)
def test_implausible_intensities_are_refused(array: np.ndarray, modality: str, words: str) -> None:
    assert words in _error(check_intensities, array, modality)


def test_plausible_intensities_pass() -> None:
    check_intensities(np.linspace(-1000, 1500, 64, dtype=np.float32).reshape(4, 4, 4), "ct")
    check_intensities(np.linspace(0, 0.71, 64, dtype=np.float32).reshape(4, 4, 4), "mri")


def test_the_modality_rule_asks_rather_than_assumes() -> None:
    assert choose_modality("MRI", "ct") == "mri"
    assert choose_modality(None, "pet") == "pet"
    message = _error(choose_modality, None, None)
    assert message.endswith(f"pass --modality {'|'.join(MODALITIES)}") and "us" in MODALITIES
