"""``sat-client`` folder runs and DICOM SEG output against the real server (the session's, from conftest)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_readers import dice, read_series, rtstruct_masks, seg_masks, sr_measurements
from dicom_series import write_series
from served import phantom

from satseg.errors import SatInputError
from satseg.geometry import Volume, load_volume
from satseg.geometry.io import sorted_series_headers
from satseg.outputs import WARNINGS_KEY, write_nifti
from satseg.outputs.nifti import save_nifti_exact
from satseg.server.triton import TritonServer, free_ports
from satseg.text import untrained_warning
from satseg_clients.cli import main as sat_client
from satseg_clients.dicom_seg import SEG_FILE, write_dicom_seg
from satseg_clients.folder_run import CASE_FILE, REPORT_FILE, WORK_FOLDER
from satseg_clients.measurement_report import SR_FILE
from satseg_clients.rtstruct import RTSTRUCT_FILE
from satseg_clients.tables import STATISTICS_TABLE, VOLUMES_TABLE

pytest.importorskip("tritonclient.grpc")
PROMPTS = "liver,spleen"


def lps(volume: Volume) -> Volume:
    """The volume stored LPS-oriented: first two axes reversed (a flipped, oblique affine)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = volume.shape[0] - 1, volume.shape[1] - 1
    return Volume(np.flip(volume.array, axis=(0, 1)).astype(np.float32).copy(), volume.affine @ flip)


def make_cases(folder: Path) -> dict[str, Volume]:
    """A NIfTI CT, an LPS NIfTI, a DICOM series folder, a truncated NIfTI and a zipped series; the expected
    grids by case."""
    folder.mkdir()
    ct, mr = phantom(seed=11, shape=(40, 36, 20)), lps(phantom(seed=12, shape=(36, 32, 18)))
    save_nifti_exact(ct.array, ct.affine, folder / "a_ct.nii.gz")
    save_nifti_exact(mr.array, mr.affine, folder / "b_lps.nii.gz")
    ct_slices = phantom(seed=13, shape=(32, 30, 12)).array
    write_series(folder / "c_series", ct_slices, pixel_spacing=(6.0, 6.0), slice_gap=8.0)
    (folder / "d_broken.nii.gz").write_bytes((folder / "a_ct.nii.gz").read_bytes()[:2000])
    with zipfile.ZipFile(folder / "e_zipped.zip", "w") as bundle:
        for path in sorted((folder / "c_series").iterdir()):
            bundle.write(path, f"export/series/{path.name}")
    series = load_volume(folder / "c_series")
    return {"a_ct": ct, "b_lps": mr, "c_series": series, "e_zipped": series}


def check_volumes_table(output: Path, expected: dict[str, Volume]) -> None:
    """``volumes.csv`` has a row per finished case (the broken one has none), each volume the mask's own voxel
    count times its voxel volume; ``statistics.csv`` holds the same volumes in long format."""
    with (output / VOLUMES_TABLE).open() as table:
        rows = list(csv.DictReader(table))
    assert [row["case"] for row in rows] == list(expected)  # report order; d_broken failed and has no row
    with (output / STATISTICS_TABLE).open() as table:
        long = {(row["case"], row["structure"], row["statistic"]): row["value"] for row in csv.DictReader(table)}
    for row in rows:
        for organ in ("liver", "spleen"):
            mask = nib.load(output / row["case"] / f"{organ}.nii.gz")
            voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000.0
            assert float(row[organ]) == pytest.approx(np.asarray(mask.dataobj).sum() * voxel_ml, abs=2e-3)
            assert float(long[(row["case"], organ, "volume_ml")]) == float(row[organ])
            assert (row["case"], organ, "bbox_min_ras_mm_z") in long


def test_folder_run_reports_the_bad_case_and_resumes(triton_server: TritonServer, tmp_path: Path) -> None:
    expected = make_cases(tmp_path / "cases")
    output = tmp_path / "out"
    command = ["-i", str(tmp_path / "cases"), "-o", str(output), "--prompts", PROMPTS, "--modality", "ct"]
    command += ["--url", triton_server.grpc_url, "--quiet", "--statistics", "--jobs", "2"]
    assert sat_client(command) == 1
    report = json.loads((output / REPORT_FILE).read_text())
    assert report["summary"] == {"done": 4, "skipped": 0, "failed": 1, "pending": 0}
    assert report["failed_cases"] == [4]
    broken = report["cases"][3]
    assert "truncated" in broken["error"] or "corrupt" in broken["error"], broken["error"]
    # Inputs are named by index (and their output folder) unless --verbose: no paths, no file names.
    assert "<case 4>" in broken["error"]
    assert "d_broken.nii.gz" not in json.dumps(report) and str(tmp_path) not in json.dumps(report)
    assert len(report["cases"][0]["model"]) == 64
    for name, volume in expected.items():
        for organ in ("liver", "spleen"):
            image = nib.load(output / name / f"{organ}.nii.gz")
            assert image.shape == volume.shape, name
            np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4, err_msg=name)
    assert not (output / WORK_FOLDER).exists()
    check_volumes_table(output, expected)
    assert sat_client(command) == 1
    again = json.loads((output / REPORT_FILE).read_text())
    assert again["summary"] == {"done": 0, "skipped": 4, "failed": 1, "pending": 0}
    check_volumes_table(output, expected)  # a rerun that skips every finished case still writes the whole table
    segs = tmp_path / "segs"
    assert sat_client([*command[:3], str(segs), *command[4:], "--output-type", "dicom_seg"]) == 1
    report = json.loads((segs / REPORT_FILE).read_text())
    assert [case["status"] for case in report["cases"]] == ["failed", "failed", "done", "failed", "done"]
    assert "DICOM SEG" in report["cases"][0]["error"]
    for name in ("c_series", "e_zipped"):
        seg = pydicom.dcmread(segs / name / SEG_FILE)
        assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "spleen"]
        assert not list((segs / name).glob("*.nii.gz")), "DICOM SEG output writes no NIfTI masks"
    check_every_output_of_one_result(triton_server, tmp_path / "cases" / "c_series", tmp_path / "all")


def check_every_output_of_one_result(triton_server: TritonServer, series: Path, output: Path) -> None:
    """``--output-type nifti,dicom_seg,rtstruct,sr``: the NIfTI masks, the SEG and the RTSTRUCT of one served
    result lie on each other in world coordinates, read back by readers we did not write, and the SR reports the
    SEG's segments with the volumes of the NIfTI masks."""
    command = ["-i", str(series), "-o", str(output), "--prompts", PROMPTS, "--modality", "ct", "--quiet"]
    assert sat_client([*command, "--url", triton_server.grpc_url, "--output-type", "sr,rtstruct,nifti,dicom_seg"]) == 0
    (case,) = [path for path in output.iterdir() if path.is_dir()]
    volume = load_volume(series)
    masks = np.stack([np.asarray(nib.load(case / f"{organ}.nii.gz").dataobj) for organ in ("liver", "spleen")])
    assert masks.any(axis=(1, 2, 3)).all(), "the demo model finds both organs on the phantom"
    seg = pydicom.dcmread(case / SEG_FILE)
    np.testing.assert_array_equal(seg_masks(seg, volume), masks)
    reported = sr_measurements(pydicom.dcmread(case / SR_FILE))
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    for number, mask in enumerate(masks, start=1):
        assert reported[number]["seg"] == seg.SOPInstanceUID
        assert reported[number]["measurements"]["Volume"][0] == pytest.approx(mask.sum() * voxel_ml, abs=2e-3)
    filled = rtstruct_masks(pydicom.dcmread(case / RTSTRUCT_FILE), read_series(series), volume)
    for organ, mask in zip(("liver", "spleen"), masks, strict=True):
        assert dice(filled[organ], mask) >= 0.95, organ
    record = json.loads((case / CASE_FILE).read_text())
    assert record["request"]["output_type"] == "nifti,dicom_seg,rtstruct,sr"


def test_a_killed_run_loses_and_duplicates_nothing(triton_server: TritonServer, tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    for seed in range(4):
        volume = phantom(seed=20 + seed, shape=(44, 40, 22))
        save_nifti_exact(volume.array, volume.affine, cases / f"case{seed}.nii.gz")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "satseg_clients.cli", "-i", str(cases), "-o", str(output), "--prompts", PROMPTS]
    command += ["--modality", "ct", "--url", triton_server.grpc_url, "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(output.glob(f"*/{CASE_FILE}")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-run: at least one case is done, the next is in flight
    process.wait()
    finished_before = {path.parent.name for path in output.glob(f"*/{CASE_FILE}")}
    assert 1 <= len(finished_before) < 4, "the kill did not land in the middle of the run"
    assert subprocess.run(command, check=False).returncode == 0
    report = json.loads((output / REPORT_FILE).read_text())
    skipped = {case["output"] for case in report["cases"] if case["status"] == "skipped"}
    done = {case["output"] for case in report["cases"] if case["status"] == "done"}
    assert skipped == finished_before and skipped | done == {f"case{seed}" for seed in range(4)}
    files = [REPORT_FILE, STATISTICS_TABLE, VOLUMES_TABLE]
    assert sorted(path.name for path in output.iterdir()) == ["case0", "case1", "case2", "case3", *files]
    for seed in range(4):
        for organ in ("liver", "spleen"):
            assert nib.load(output / f"case{seed}" / f"{organ}.nii.gz").shape == (44, 40, 22)


@pytest.mark.parametrize("emptied", [("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), ("SOPInstanceUID",)])
def test_a_series_with_empty_uids_is_read_but_gets_no_dicom_seg(tmp_path: Path, emptied: tuple[str, ...]) -> None:
    """Anonymised series with empty UIDs (the TotalSegmentator example series is one): the volume reads (NIfTI
    output needs no UID), the SEG is refused in one line naming the empty UID, never a bare KeyError."""
    pytest.importorskip("highdicom")
    series = tmp_path / "series"
    write_series(series, phantom(seed=15, shape=(20, 18, 6)).array, pixel_spacing=(6.0, 6.0), slice_gap=8.0)
    for path in series.iterdir():
        dataset = pydicom.dcmread(path)
        for name in emptied:
            setattr(dataset, name, "")
        dataset.save_as(path)
    volume = load_volume(series)
    masks = np.ones((1, *volume.shape), np.uint8)
    with pytest.raises(SatInputError) as refused:
        write_dicom_seg(masks, ["liver"], series, tmp_path / "seg.dcm")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and f"its {emptied[0]} is empty" in message
    assert not (tmp_path / "seg.dcm").exists()


def test_dicom_seg_segments_overlay_the_source_slices(tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    series = tmp_path / "series"
    write_series(series, phantom(seed=14, shape=(30, 26, 10)).array, pixel_spacing=(6.0, 6.0), slice_gap=8.0)
    volume = load_volume(series)
    rng = np.random.default_rng(0)
    masks = (rng.random((2, *volume.shape)) > 0.7).astype(np.uint8)
    masks[1, :, :, 3] = 0  # an empty slice stays a frame of zeros
    path = write_dicom_seg(masks, ["liver", "left kidney"], series, tmp_path / "seg.dcm")
    files = [write_nifti(mask, volume.affine, tmp_path / f"{index}.nii.gz") for index, mask in enumerate(masks)]
    nifti = [np.asarray(nib.load(file).dataobj) for file in files]
    seg = pydicom.dcmread(path)
    assert "not for clinical use" in seg.SeriesDescription
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "left kidney"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning.lower() == "liver"
    slice_of = {ds.SOPInstanceUID: k for k, (_, ds) in enumerate(sorted_series_headers(series))}
    headers = [ds for _, ds in sorted_series_headers(series)]
    pixels = seg.pixel_array
    assert pixels.shape[0] == 2 * volume.shape[2]
    for frame, groups in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[source]
        segment = groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        np.testing.assert_array_equal(pixels[frame], nifti[segment - 1][:, :, k].T, err_msg=f"frame {frame}")
        position = groups.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], headers[k].ImagePositionPatient, atol=1e-3)


def test_an_absent_server_is_waited_for_within_the_retry_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volume = phantom(seed=15, shape=(24, 20, 12))
    save_nifti_exact(volume.array, volume.affine, tmp_path / "ct.nii.gz")
    command = ["-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out"), "--prompts", PROMPTS]
    started = time.monotonic()
    code = sat_client([*command, "--url", f"127.0.0.1:{free_ports(1)[0]}", "--retry-budget", "1.5", "--quiet"])
    waited = time.monotonic() - started
    assert code == 1 and 1.5 <= waited < 10.0
    printed = capsys.readouterr().err
    assert "waiting up to 1.5 s" in printed and "no ready SAT server" in printed and "within 1.5 s" in printed


def test_a_folder_run_records_the_untrained_term_warning(triton_server: TritonServer, tmp_path: Path) -> None:
    volume = phantom(seed=9, shape=(32, 28, 16))
    (tmp_path / "cases").mkdir()
    nib.save(nib.Nifti1Image(volume.array, volume.affine), tmp_path / "cases" / "a.nii.gz")
    output = tmp_path / "out"
    command = ["-i", str(tmp_path / "cases"), "-o", str(output), "--prompts", "pancreas,liver", "--modality", "ct"]
    assert sat_client([*command, "--url", triton_server.grpc_url, "--quiet"]) == 0
    warning = untrained_warning(["pancreas"])
    assert json.loads((output / "a" / CASE_FILE).read_text())[WARNINGS_KEY] == [warning]
    assert json.loads((output / REPORT_FILE).read_text())["cases"][0][WARNINGS_KEY] == [warning]


def test_all_trained_asks_the_server_for_the_served_model_s_trained_terms(
    triton_server: TritonServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--prompts all-trained --modality ct`` segments each trained CT term of the served demo model, with no
    untrained warning; without --modality it is refused in one line before any request."""
    from satseg.checkout import BUNDLED_CHECKPOINT
    from satseg.checkpoint import read_metadata
    from satseg.text import Vocabulary

    vocabulary = Vocabulary.load()
    trained = read_metadata(BUNDLED_CHECKPOINT).model_spec(vocabulary).trained_terms or {}
    expected = sorted(set(trained) & set(vocabulary.for_modality("ct")))
    volume = phantom(seed=10, shape=(32, 28, 16))
    (tmp_path / "cases").mkdir()
    nib.save(nib.Nifti1Image(volume.array, volume.affine), tmp_path / "cases" / "a.nii.gz")
    command = ["-i", str(tmp_path / "cases"), "-o", str(tmp_path / "out"), "--prompts", "all-trained"]
    assert sat_client([*command, "--url", triton_server.grpc_url, "--quiet"]) == 2
    assert "--prompts all-trained needs --modality" in capsys.readouterr().err
    assert sat_client([*command, "--modality", "ct", "--url", triton_server.grpc_url, "--quiet", "--ml"]) == 0
    case = json.loads((tmp_path / "out" / "a" / CASE_FILE).read_text())
    assert sorted(case["request"]["prompts"]) == expected and len(expected) >= 2
    assert case[WARNINGS_KEY] == []


def test_shards_cover_every_case_once_into_one_folder_and_a_rerun_skips(
    triton_server: TritonServer, tmp_path: Path
) -> None:
    """Two shards of a folder run, as an Indexed Job runs them, at the same time into one output folder."""
    cases = tmp_path / "cases"
    cases.mkdir()
    names = [f"case{seed}" for seed in range(6)]
    for seed, name in enumerate(names):
        volume = phantom(seed=40 + seed, shape=(24, 22, 10))
        save_nifti_exact(volume.array, volume.affine, cases / f"{name}.nii.gz")
    output = tmp_path / "out"
    command = [sys.executable, "-m", "satseg_clients.cli", "-i", str(cases), "-o", str(output), "--prompts", "liver"]
    command += ["--modality", "ct", "--url", triton_server.grpc_url, "--quiet"]
    shards = [subprocess.Popen([*command, "--shard", f"{i}/2"], stderr=subprocess.PIPE) for i in (1, 2)]
    assert [shard.wait(timeout=300) for shard in shards] == [0, 0]
    reports = [json.loads((output / f"run_report.shard-{i}-of-2.json").read_text()) for i in (1, 2)]
    done = [[case["output"] for case in report["cases"] if case["status"] == "done"] for report in reports]
    assert sorted(done[0] + done[1]) == names and not set(done[0]) & set(done[1])
    assert all(done), "each shard got some of the six cases (3 and 3 by their names' hashes)"
    assert sorted(path.parent.name for path in output.glob(f"*/{CASE_FILE}")) == names
    assert not list(output.glob(f"{WORK_FOLDER}*")) and not (output / REPORT_FILE).exists()
    again = subprocess.run([*command, "--shard", "2/2"], capture_output=True, check=True)
    rerun = json.loads((output / "run_report.shard-2-of-2.json").read_text())
    assert rerun["summary"] == {"done": 0, "skipped": len(done[1]), "failed": 0, "pending": 0}, again.stderr
    with pytest.raises(SystemExit, match="2"):  # refused by the parser, with its reason
        sat_client([*command[3:], "--shard", "3/2"])
