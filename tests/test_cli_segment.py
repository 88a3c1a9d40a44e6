"""``sat-segment`` end to end: real volumes, outputs on the input grid, and one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from conftest import DEMO_CHECKPOINT
from dicom_series import distinct_hu, write_series

from satseg.cli.segment import main as segment_cli
from satseg.geometry import load_volume
from satseg.outputs import read_label_extension
from satseg.outputs.run_folder import MANIFEST_FILE
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.text import untrained_warning


def run_cli(
    capsys: pytest.CaptureFixture[str], source: Path, out: Path, checkpoint: Path, *options: str
) -> tuple[int, str, str]:
    """Run sat-segment in this process; NIfTI inputs get ``--modality ct`` unless the options name one."""
    if "--modality" not in options and not source.is_dir():
        options = (*options, "--modality", "ct")
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
    out = earlier_run(tmp_path / "out")
    source = make_input(tmp_path)
    code, _, stderr = run_cli(capsys, source, out, tiny_checkpoint, "--prompts", prompts)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sat-segment: error: "), stderr
    assert words in lines[0]
    assert folder_bytes(out) == EARLIER_RUN


EARLIER_RUN = {"liver.nii.gz": b"an earlier result", MANIFEST_FILE: b'{"files": ["liver.nii.gz"]}'}


def earlier_run(out: Path) -> Path:
    """A folder as an earlier run left it: its files and the manifest listing them."""
    out.mkdir()
    for name, data in EARLIER_RUN.items():
        (out / name).write_bytes(data)
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


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
            "--modality",
            "ct",
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


# --- hardening: checks before work, one rule for the modality, whole folders ------------------------


def test_an_existing_file_as_output_is_refused_before_inference(
    phantom_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to end in a FileExistsError traceback, and only after inference."""
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    missing_checkpoint = tmp_path / "no-such-checkpoint"  # never opened: the output is checked first
    code, _, stderr = run_cli(capsys, phantom_path, taken, missing_checkpoint, "--prompts", "liver")
    assert code == 2
    assert stderr.strip() == f"sat-segment: error: -o {taken} is an existing file; name a folder (it is created)"
    assert taken.read_text() == "a user's file"


def test_a_folder_with_foreign_files_is_refused_not_replaced(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run_cli(capsys, phantom_path, out, tiny_checkpoint, "--prompts", "liver")
    assert code == 2 and "holds files an earlier run did not write (notes.txt)" in stderr
    assert folder_bytes(out) == {"notes.txt": b"mine"}


def test_a_nifti_without_modality_is_refused_with_the_shared_message(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sat-segment assumed ct where sat-client refused; now both ask, in the same words."""
    code = segment_cli(["-i", str(phantom_path), "-o", str(tmp_path / "o"), "--prompts", "liver", "--quiet"])
    stderr = capsys.readouterr().err.strip()
    assert code == 2
    assert stderr == "sat-segment: error: the modality is not known from the file (NIfTI has none); " + (
        "pass --modality ct|mri|us|pet"
    )


@pytest.mark.parametrize(("scale", "words"), [(0.0, "image is constant"), (1 / 1400, "CT values span")])
def test_a_ct_that_is_not_in_hounsfield_units_is_refused_like_the_server_does(
    phantom_path: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    scale: float,
    words: str,
) -> None:
    """A CT rescaled to 0..1 gave a 'liver' of half the crop with exit 0; an all-zero CT passed silently."""
    source = nib.load(phantom_path)
    rescaled = (np.asanyarray(source.dataobj).astype(np.float32) + 1024) * scale
    path = write_nifti(tmp_path / "rescaled.nii.gz", rescaled, source.affine)
    code, _, stderr = run_cli(capsys, path, tmp_path / "out", tiny_checkpoint, "--prompts", "liver")
    assert code == 2 and words in stderr
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_other_prompts_leaves_no_stale_masks(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    first = run_cli(capsys, phantom_path, out, tiny_checkpoint, "--prompts", "liver,spleen", "--statistics")
    second = run_cli(capsys, phantom_path, out, tiny_checkpoint, "--prompts", "left kidney")
    assert first[0] == 0 and second[0] == 0
    assert sorted(path.name for path in out.iterdir()) == ["labels.json", "left_kidney.nii.gz", MANIFEST_FILE]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"] == ["labels.json", "left_kidney.nii.gz"] and manifest["terms"] == ["left kidney"]
    assert "not for clinical use" in manifest["notice"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"], "no work folder is left beside it"


INTERRUPT_POINTS = {
    "during inference": ("satseg.pipeline.Segmenter.predict_logits", 2),
    "after some masks": ("satseg.outputs.writer.write_mask", 3),
    "writing the summary": ("satseg.cli.segment.write_result", 1),
    "writing the manifest": ("satseg.outputs.run_folder.write_json", 1),
    "swapping in": ("satseg.outputs.run_folder.swap_into_place", 1),
}


@pytest.mark.parametrize("point", list(INTERRUPT_POINTS))
def test_ctrl_c_leaves_the_earlier_complete_result(
    point: str,
    phantom_path: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while writing 40 masks left 32 new masks, 10 old ones and the old labels.json side by side."""
    out = tmp_path / "out"
    assert run_cli(capsys, phantom_path, out, tiny_checkpoint, "--prompts", "liver,spleen", "--statistics")[0] == 0
    before = folder_bytes(out)
    target, calls_before_interrupt = INTERRUPT_POINTS[point]
    module_name, _, attribute = target.rpartition(".")
    owner = _resolve(module_name)
    original = getattr(owner, attribute)
    calls = {"count": 0}

    def interrupted(*args: object, **kwargs: object) -> object:
        calls["count"] += 1
        if calls["count"] >= calls_before_interrupt:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, interrupted)
    prompts = "left kidney,right kidney,stomach,aorta"
    code, _, stderr = run_cli(capsys, phantom_path, out, tiny_checkpoint, "--prompts", prompts)
    assert code == 130 and calls["count"] >= calls_before_interrupt, stderr
    assert folder_bytes(out) == before
    assert [path.name for path in tmp_path.iterdir()] == ["out"], "the interrupted run's work folder is removed"


def _resolve(dotted: str) -> object:
    """A module, or a class inside one, by its dotted name."""
    import importlib

    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            owner: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            owner = getattr(owner, name)
        return owner
    raise ModuleNotFoundError(dotted)


def test_sigint_to_the_real_command_keeps_the_earlier_result(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The installed command, interrupted by a real SIGINT once its work folder holds a first mask."""
    shape = (40, 32, 12)
    volume, _, _ = make_torso_phantom(shape, centred_affine(shape, (8.0, 8.0, 10.0), 15.0))
    source = write_nifti(tmp_path / "ct.nii.gz", volume.array, volume.affine)
    out = earlier_run(tmp_path / "out")
    prompts = ",".join(["liver", "spleen", "left kidney", "right kidney", "stomach", "aorta", "pancreas"] * 1)
    command = [sys.executable, "-m", "satseg.cli.segment", "-i", str(source), "-o", str(out), "--modality", "ct"]
    command += ["--checkpoint", str(tiny_checkpoint), "--prompts", prompts, "--quiet", "--preview"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(work.is_dir() and any(work.glob("*.nii.gz")) for work in tmp_path.glob(".out.sat-work-*")):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert folder_bytes(out) == EARLIER_RUN
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ct.nii.gz", "out"]


def test_running_out_of_memory_is_one_line_not_a_traceback(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Under a memory limit (prlimit --as) an allocation fails with MemoryError; it ended in a traceback.
    Here the real command runs with 3 GiB of address space to spare and loading allocates 8 GiB more."""
    code = (
        "import resource, sys\n"
        "import numpy\n"
        "import satseg.cli.segment as cli\n"
        "loaded = cli.load_volume\n"
        "cli.load_volume = lambda path: (numpy.ones(2**33, numpy.uint8), loaded(path))[1]\n"
        "spare = 3 * 2**30 + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (spare, spare))\n"
        f"sys.exit(cli.main(['-i', {str(phantom_path)!r}, '-o', {str(tmp_path / 'o')!r}, '--modality', 'ct', "
        f"'--prompts', 'liver', '--checkpoint', {str(tiny_checkpoint)!r}, '--quiet']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().startswith("sat-segment: error: out of memory;") and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_a_prompt_the_demo_was_not_trained_on_runs_with_a_one_line_warning(
    phantom_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bundled demo knows its trained terms and the parents they make up ("kidney"); "pancreas" is not one."""
    out = tmp_path / "out"
    options = ("--prompts", "pancreas,kidney", "--statistics")
    code, _, stderr = run_cli(capsys, phantom_path, out, DEMO_CHECKPOINT, *options)
    warning = untrained_warning(["pancreas"])
    assert code == 0
    assert stderr.strip().splitlines() == [f"warning: {warning}"]
    assert (out / "pancreas.nii.gz").is_file()
    assert json.loads((out / "statistics.json").read_text())["warnings"] == [warning]
    assert json.loads((out / MANIFEST_FILE).read_text())["warnings"] == [warning]


def test_a_300_character_prompt_completes_with_its_full_text_kept(
    phantom_path: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long free-text prompt once failed after inference with ``File name too long``; its file name is bounded
    and its full text stays in labels.json and the mask's header."""
    long_prompt = ("the hypodense lesion in segment seven of the liver next to the right kidney " * 4)[:300].strip()
    out = tmp_path / "out"
    options = ("--prompts", f"{long_prompt},liver", "--allow-free-text")
    code, _, stderr = run_cli(capsys, phantom_path, out, tiny_checkpoint, *options)
    assert code == 0, stderr
    assert json.loads((out / "labels.json").read_text()) == {"1": long_prompt, "2": "liver"}
    masks = sorted(out.glob("*.nii.gz"))
    assert [path.name for path in masks if path.name == "liver.nii.gz"] and len(masks) == 2
    long_mask = next(path for path in masks if path.name != "liver.nii.gz")
    assert len(long_mask.name) <= 80 and read_label_extension(long_mask) == {1: long_prompt}


def test_all_trained_asks_for_every_term_the_demo_was_trained_on_for_the_modality(
    phantom_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--prompts all-trained`` segments exactly the checkpoint's trained CT terms, with no untrained warning."""
    from satseg.checkpoint import read_metadata
    from satseg.text import Vocabulary

    vocabulary = Vocabulary.load()
    trained = read_metadata(DEMO_CHECKPOINT).model_spec(vocabulary).trained_terms
    assert trained
    expected = sorted(set(trained) & set(vocabulary.for_modality("ct")))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, phantom_path, out, DEMO_CHECKPOINT, "--prompts", "All-Trained", "--ml")
    assert code == 0, stderr
    assert stderr == ""
    labels = json.loads((out / "labels.json").read_text())
    assert list(labels.values()) == expected and len(expected) < len(vocabulary.for_modality("ct"))
    assert f"segmented {len(expected)} structure(s)" in stdout
