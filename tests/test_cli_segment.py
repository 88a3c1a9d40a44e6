"""``sat-segment`` end to end: real volumes, outputs on the input grid, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from dicom_series import distinct_hu, write_series

from satseg.cli.segment import main as segment_cli
from satseg.geometry import load_volume
from satseg.outputs import read_label_extension
from training.data.phantom import centred_affine, make_torso_phantom


def run_cli(
    capsys: pytest.CaptureFixture[str], source: Path, out: Path, checkpoint: Path, *options: str
) -> tuple[int, str, str]:
    code = segment_cli(["-i", str(source), "-o", str(out), "--checkpoint", str(checkpoint), *options, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_on_input_grid(output: Path, source: nib.Nifti1Image) -> None:
    image = nib.load(output)
    assert image.shape == source.shape[:3]
    np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A 320 x 256 x 120 mm field of view: air around the body, and few windows for the tiny model.
    shape = (40, 32, 12)
    volume, _, _ = make_torso_phantom(shape, centred_affine(shape, (8.0, 8.0, 10.0), 15.0))
    path = tmp_path_factory.mktemp("input") / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(volume.array, volume.affine), path)
    return path


def test_masks_labels_statistics_and_preview(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys, phantom_path, out, tiny_checkpoint, "--prompts", "liver, kidney_left", "--statistics", "--preview"
    )
    assert code == 0, stdout
    source = nib.load(phantom_path)
    for name, term in (("liver.nii.gz", "liver"), ("left_kidney.nii.gz", "left kidney")):
        assert_on_input_grid(out / name, source)
        assert nib.load(out / name).get_data_dtype() == np.uint8
        assert read_label_extension(out / name) == {1: term}
    assert json.loads((out / "labels.json").read_text()) == {"1": "liver", "2": "left kidney"}
    statistics = json.loads((out / "statistics.json").read_text())
    voxel_ml = abs(np.linalg.det(source.affine[:3, :3])) / 1000
    liver = np.asarray(nib.load(out / "liver.nii.gz").dataobj)
    assert statistics["liver"]["voxels"] == int(liver.sum())
    assert statistics["liver"]["volume_ml"] == pytest.approx(liver.sum() * voxel_ml, abs=1e-3)
    preview = matplotlib.image.imread(out / "preview.png")
    height, width = preview.shape[:2]
    # The CT soft-tissue window shows tissue mid-grey; a percentile window over air would wash it out to white.
    assert preview[int(0.4 * height) : int(0.5 * height), int(0.1 * width) : int(0.2 * width), :3].mean() < 0.8
    assert "segmented 2 structure(s)" in stdout


def test_merged_label_map(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, phantom_path, out, tiny_checkpoint, "--prompts", "liver,spleen,stomach", "--ml")
    assert code == 0
    labelmap = nib.load(out / "labelmap.nii.gz")
    assert_on_input_grid(out / "labelmap.nii.gz", nib.load(phantom_path))
    assert labelmap.get_data_dtype() == np.uint16
    assert set(np.unique(np.asarray(labelmap.dataobj))) <= {0, 1, 2, 3}
    assert read_label_extension(out / "labelmap.nii.gz") == {1: "liver", 2: "spleen", 3: "stomach"}
    assert not (out / "liver.nii.gz").exists()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("real_ct", "totalseg/example_ct.nii.gz"),
        ("real_mr_lps", "totalseg/example_mr_sm.nii.gz"),
    ],
)
def test_real_volumes_keep_their_grid(
    case: str,
    expected: str,
    shared_data: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source_path = shared_data / expected
    modality, prompts = ("mri", "liver,spleen") if "mr" in case else ("ct", "liver,left kidney")
    out = tmp_path / case
    code, _, stderr = run_cli(
        capsys,
        source_path,
        out,
        tiny_checkpoint,
        "--prompts",
        prompts,
        "--modality",
        modality,
        "--ml",
        "--batch-size",
        "2",
    )
    assert code == 0, stderr
    assert_on_input_grid(out / "labelmap.nii.gz", nib.load(source_path))


def test_dicom_series_in_masks_out_on_its_grid(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = tmp_path / "series"
    write_series(series, np.clip(distinct_hu((40, 32, 12)), -1024, None))
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, series, out, tiny_checkpoint, "--prompts", "liver")
    assert code == 0, stderr
    source = load_volume(series)
    mask = nib.load(out / "liver.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
    assert "note:" not in stderr, "the modality comes from the DICOM header"


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), path)
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zero_spacing(path: Path) -> Path:
    """A NIfTI whose stored pixdim[2] is 0 (nibabel would fix it on save, so patch the bytes)."""
    write_nifti(path, np.zeros((8, 8, 8), np.int16))
    data = bytearray(path.read_bytes())
    data[84:88] = np.float32(0).tobytes()  # pixdim[2]
    data[252:256] = np.array([1, 0], dtype=np.int16).tobytes()  # qform_code 1, sform_code 0
    path.write_bytes(bytes(data))
    return path


def dicom_with_gap(folder: Path) -> Path:
    write_series(folder, distinct_hu((6, 5, 5)), slices=[0, 1, 3, 4])
    return folder


def nan_volume() -> np.ndarray:
    array = np.zeros((20, 20, 10), dtype=np.float32)
    array[3, 4, 5] = np.nan
    return array


BAD_INPUTS = {
    "2d image": (lambda d: write_nifti(d / "a.nii.gz", np.zeros((32, 32), np.int16)), "liver", "2D"),
    "4d image": (lambda d: write_nifti(d / "a.nii.gz", np.zeros((8, 8, 8, 3), np.int16)), "liver", "4D"),
    "nan values": (lambda d: write_nifti(d / "a.nii.gz", nan_volume()), "liver", "NaN"),
    "zero spacing": (lambda d: zero_spacing(d / "a.nii"), "liver", "spacing"),
    "empty prompts": (lambda d: write_nifti(d / "a.nii.gz", np.zeros((8, 8, 8), np.int16)), " , ", "no prompts"),
    "unknown prompt": (
        lambda d: write_nifti(d / "a.nii.gz", np.zeros((8, 8, 8), np.int16)),
        "livr",
        "closest known terms: liver",
    ),
    "dicom missing slice": (
        lambda d: dicom_with_gap(d / "series"),
        "liver",
        "missing slice",
    ),
    "truncated file": (
        lambda d: truncated(write_nifti(d / "a.nii.gz", np.random.default_rng(0).normal(size=(40, 40, 40)))),
        "liver",
        "truncated",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_keeps_earlier_results(
    case: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_input, prompts, words = BAD_INPUTS[case]
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "liver.nii.gz"
    earlier.write_bytes(b"an earlier result")
    source = make_input(tmp_path)
    code, _, stderr = run_cli(capsys, source, out, tiny_checkpoint, "--prompts", prompts)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sat-segment: error: "), stderr
    assert words in lines[0]
    assert earlier.read_bytes() == b"an earlier result"
    assert sorted(path.name for path in out.iterdir()) == ["liver.nii.gz"]


def test_the_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    source = write_nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.int16))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "satseg.cli.segment",
            "-i",
            str(source),
            "-o",
            str(tmp_path / "o"),
            "--prompts",
            "liver",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("sat-segment: error: image is 2D")


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        segment_cli(["--help"])
    text = capsys.readouterr().out
    for words in ("--prompts", "labelmap.nii.gz", "highest probability wins", "examples:", "Not for clinical use"):
        assert words in text


def test_fp16_on_the_cpu_is_refused_in_one_line(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ("--prompts", "liver", "--modality", "ct", "--device", "cpu", "--precision", "fp16")
    code, _, stderr = run_cli(capsys, phantom_path, tmp_path / "out", tiny_checkpoint, *options)
    assert code == 2
    assert stderr.strip() == "sat-segment: error: precision fp16 needs a CUDA device, not cpu; the CPU runs fp32"
    assert not (tmp_path / "out").exists()
