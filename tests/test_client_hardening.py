"""``sat-client`` and ``SATClient`` against hostile or changing inputs (issue 16, client side), on the session's
real server from conftest: resume that checks what it skips, local refusals, one modality rule, size limits."""

from __future__ import annotations

import gzip
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from served import phantom

from satseg.contract import PROMPT_ENCODER_MODEL
from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.geometry.io import check_intensities
from satseg.geometry.volume import MODALITIES, choose_modality
from satseg.outputs.nifti import save_nifti_exact
from satseg.server.triton import TritonServer, free_ports
from satseg_clients import SATClient
from satseg_clients.cases import assign_folders, name_hash, source_identity
from satseg_clients.cli import main as sat_client
from satseg_clients.folder_run import CASE_FILE, REPORT_FILE
from satseg_clients.sat_client import backoff_delay

pytest.importorskip("tritonclient.grpc")
SMALL = (32, 28, 16)
OTHER = (28, 24, 14)
PROMPTS = "liver"


def model_requests(client: SATClient, model: str) -> int:
    """Requests ``model`` has answered or failed so far (Triton's statistics; needs the admin key)."""
    stats = client.inference_statistics()["model_stats"]
    counts = [
        entry["inference_stats"][outcome].get("count", 0)
        for outcome in ("success", "fail")
        for entry in stats
        if entry["name"] == model
    ]
    return sum(int(count) for count in counts)


def counted_requests(client: SATClient, model: str, expected: int, timeout_s: float = 10.0) -> int:
    """``model_requests`` once it reaches ``expected`` or the time is up, read again a moment later: Triton
    counts a request after its answer has left, so a client that failed on receiving it may look first."""
    deadline = time.monotonic() + timeout_s
    while model_requests(client, model) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a retry (there must be none) would be counted by now too
    return model_requests(client, model)


def test_an_answer_over_a_message_limit_is_a_refusal_not_an_outage(triton_server: TritonServer) -> None:
    import tritonclient.grpc

    client = SATClient(triton_server.grpc_url, shared_memory="off")
    # A receive limit below the answer's size: gRPC itself answers RESOURCE_EXHAUSTED, as for any message over
    # a limit (the 16 KB metadata limit an error message once exceeded, a proxy's message cap).
    client._connection = tritonclient.grpc.InferenceServerClient(
        triton_server.grpc_url, channel_args=[("grpc.max_receive_message_length", 1024)]
    )
    with SATClient(triton_server.grpc_url, admin_key=triton_server.admin_key) as observer:
        before = model_requests(observer, "sat")
        with client, pytest.raises(SatInputError, match="size limit") as refused:
            client.segment(phantom(seed=40, shape=SMALL), [PROMPTS], "ct")
        assert counted_requests(observer, "sat", before + 1) == before + 1, "a refusal is never retried"
    assert "not an outage" in str(refused.value) and "\n" not in str(refused.value)


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(attempt, 0.5) for attempt in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff_delay(10_000, 0.5) == 4.0


def save(volume: Volume, path: Path) -> Path:
    """Write ``volume`` as ``.nii.gz`` (exact affine) or, for a ``.nii`` name, uncompressed."""
    if path.name.endswith(".gz"):
        return save_nifti_exact(volume.array, volume.affine, path)
    nib.save(nib.Nifti1Image(volume.array, volume.affine), path)
    return path


def folder_run(server: TritonServer, cases: Path, output: Path, *options: str) -> tuple[int, dict[str, Any]]:
    """One ``sat-client`` run (quiet, CT unless options say otherwise); its exit status and report."""
    command = ["-i", str(cases), "-o", str(output), "--prompts", PROMPTS, "--url", server.grpc_url, "--quiet"]
    code = sat_client([*command, *options])
    return code, json.loads((output / REPORT_FILE).read_text())


def mask_shape(output: Path, folder: str) -> tuple[int, ...]:
    return tuple(nib.load(output / folder / f"{PROMPTS}.nii.gz").shape)


def header_bomb(path: Path, shape: tuple[int, int, int] = (2000, 2000, 2000)) -> Path:
    """A ``.nii.gz`` of a few dozen bytes whose header declares ``shape`` int16 (16 GB for 2000^3)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_data_offset(352)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))  # 348-byte header + empty extension flag
    return path


def test_a_header_bomb_fails_its_case_alone(triton_server: TritonServer, tmp_path: Path) -> None:
    cases, output = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    assert header_bomb(cases / "a_bomb.nii.gz").stat().st_size < 100
    save(phantom(seed=38, shape=SMALL), cases / "b_good.nii.gz")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    code, report = folder_run(triton_server, cases, output, "--modality", "ct")
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 2**20
    assert code == 1 and report["summary"]["failed"] == 1 and report["summary"]["done"] == 1
    error = report["cases"][0]["error"]
    assert "declares" in error and "\n" not in error and "<case 1>" in error, error
    assert "a_bomb.nii.gz" not in json.dumps(report)
    assert grown_gib < 1.0, f"the run's peak memory grew {grown_gib:.1f} GiB"
    assert mask_shape(output, "b_good") == SMALL


def test_a_nifti_without_modality_gets_the_shared_rule(triton_server: TritonServer, tmp_path: Path) -> None:
    cases, output = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    save(phantom(seed=39, shape=SMALL), cases / "a.nii.gz")
    with pytest.raises(SatInputError) as rule:
        choose_modality(None, None)
    assert "|".join(MODALITIES) in str(rule.value)
    code, report = folder_run(triton_server, cases, output)
    assert code == 1 and report["cases"][0]["error"] == str(rule.value)
    with SATClient(triton_server.grpc_url) as client, pytest.raises(SatInputError) as refused:
        client.segment(Volume(phantom(seed=39, shape=SMALL).array, np.eye(4)), [PROMPTS])
    assert str(refused.value) == str(rule.value)


@pytest.mark.parametrize(
    ("array", "modality"),
    [
        (np.zeros(SMALL, dtype=np.int16), "ct"),  # an all-zero CT
        (np.random.default_rng(0).random(SMALL, dtype=np.float32), "ct"),  # a CT rescaled to 0..1
        (np.full(SMALL, 7.0, dtype=np.float32), "mri"),  # a constant image of any modality
    ],
)
def test_implausible_intensities_are_refused_before_sending(array: np.ndarray, modality: str) -> None:
    with pytest.raises(SatInputError) as rule:
        check_intensities(array, modality)
    # No server listens there: the refusal is the client's own, at once, with the server's message.
    with SATClient(f"127.0.0.1:{free_ports(1)[0]}") as client, pytest.raises(SatInputError) as refused:
        started = time.monotonic()
        client.segment(Volume(array, np.diag([2.0, 2.0, 3.0, 1.0])), [PROMPTS], modality)
    assert str(refused.value) == str(rule.value)
    assert time.monotonic() - started < 1.0


def outcome(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Input file name -> (status, output folder), from a ``--verbose`` report."""
    return {Path(case["input"]).name: (case["status"], case["output"]) for case in report["cases"]}


def test_a_replaced_input_is_redone(triton_server: TritonServer, tmp_path: Path) -> None:
    cases, output = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    save(phantom(seed=31, shape=SMALL), cases / "a.nii.gz")
    save(phantom(seed=32, shape=SMALL), cases / "b.nii.gz")
    assert folder_run(triton_server, cases, output, "--modality", "ct")[0] == 0
    save(phantom(seed=33, shape=OTHER), cases / "b.nii.gz")  # another volume under the same name
    code, report = folder_run(triton_server, cases, output, "--modality", "ct", "--verbose")
    assert code == 0
    assert outcome(report) == {"a.nii.gz": ("skipped", "a"), "b.nii.gz": ("done", "b")}
    assert mask_shape(output, "b") == OTHER


def test_a_replaced_input_that_fails_leaves_no_stale_results(triton_server: TritonServer, tmp_path: Path) -> None:
    cases, output = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    good = save(phantom(seed=41, shape=SMALL), cases / "a.nii.gz")
    assert folder_run(triton_server, cases, output, "--modality", "ct")[0] == 0
    good.write_bytes(good.read_bytes()[:2000])  # replaced by a truncated file
    code, report = folder_run(triton_server, cases, output, "--modality", "ct")
    assert code == 1 and report["cases"][0]["status"] == "failed"
    assert not (output / "a").exists(), "the old volume's masks would pass for the new file's"


def test_a_case_done_by_another_model_is_redone(triton_server: TritonServer, tmp_path: Path) -> None:
    cases, output = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    save(phantom(seed=36, shape=SMALL), cases / "a.nii.gz")
    save(phantom(seed=37, shape=SMALL), cases / "b.nii.gz")
    assert folder_run(triton_server, cases, output, "--modality", "ct")[0] == 0
    record = json.loads((output / "a" / CASE_FILE).read_text())
    assert len(record["model"]) == 64
    record["model"] = "0" * 64  # as if another export had answered
    (output / "a" / CASE_FILE).write_text(json.dumps(record))
    code, report = folder_run(triton_server, cases, output, "--modality", "ct", "--verbose")
    assert code == 0
    assert outcome(report) == {"a.nii.gz": ("done", "a"), "b.nii.gz": ("skipped", "b")}
    assert json.loads((output / "a" / CASE_FILE).read_text())["model"] == report["cases"][0]["model"]


def test_a_newcomer_beside_a_case_gets_its_own_folder(triton_server: TritonServer, tmp_path: Path) -> None:
    cases, output = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    save(phantom(seed=34, shape=SMALL), cases / "a.nii.gz")
    assert folder_run(triton_server, cases, output, "--modality", "ct")[0] == 0
    save(phantom(seed=35, shape=OTHER), cases / "a.nii")  # sorts before a.nii.gz, same case name
    code, report = folder_run(triton_server, cases, output, "--modality", "ct", "--verbose")
    assert code == 0
    first = outcome(report)
    assert first["a.nii.gz"] == ("skipped", "a")
    status, newcomer = first["a.nii"]
    assert status == "done" and newcomer != "a"
    assert mask_shape(output, "a") == SMALL and mask_shape(output, newcomer) == OTHER
    again = outcome(folder_run(triton_server, cases, output, "--modality", "ct", "--verbose")[1])
    assert again == {"a.nii.gz": ("skipped", "a"), "a.nii": ("skipped", newcomer)}


def test_the_model_hash_is_the_served_models_and_asked_once(triton_server: TritonServer) -> None:
    with SATClient(triton_server.grpc_url, admin_key=triton_server.admin_key, shared_memory="off") as client:
        model = client.model_hash(PROMPTS, "ct")
        assert model == client.segment(phantom(seed=42, shape=SMALL), [PROMPTS], "ct").model
        encoder_calls = model_requests(client, PROMPT_ENCODER_MODEL)
        assert client.model_hash(PROMPTS) == model
        assert model_requests(client, PROMPT_ENCODER_MODEL) == encoder_calls, "cached per client"
    with SATClient(triton_server.grpc_url) as other, pytest.raises(SatInputError, match="livr"):
        other.model_hash("livr")


def test_folders_stay_with_their_inputs() -> None:
    old, new = name_hash("a.nii.gz"), name_hash("a.nii")
    assert assign_folders([("a", new), ("a", old)], {}) == ["a", f"a_{old[:8]}"]  # a fresh run: sorted order
    # An earlier run recorded folder "a" for a.nii.gz: it keeps it; the newcomer is suffixed, by its own name.
    assert assign_folders([("a", new), ("a", old)], {old: "a"}) == [f"a_{new[:8]}", "a"]
    assert assign_folders([("a", new)], {old: "a"}) == [f"a_{new[:8]}"]  # even with a.nii.gz gone
    assert assign_folders([("a", new)], {}, taken={"a", f"a_{new[:8]}"}) == [f"a_{new[:8]}_2"]
    assert assign_folders([("b", new)], {new: "b_old"}) == ["b_old"]


def test_source_identity_sees_replacements_and_edits(tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(3 << 20))
    first = source_identity(path)
    assert source_identity(path) == first

    def edited(offset: int) -> str:
        """The identity after one byte at ``offset`` changed, size and mtime kept."""
        status = path.stat()
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        return source_identity(path)

    assert edited(10) != first  # the header
    assert edited(10) == first  # edited back
    assert edited((3 << 20) - 5) != first  # the data's end
    edited((3 << 20) - 5)
    assert edited(3 << 19) == first  # the middle, mtime restored by hand: the known blind spot
    os.utime(path, ns=(0, 1))
    assert source_identity(path) != first
    series = tmp_path / "series"
    series.mkdir()
    for index in range(3):
        (series / f"{index}.dcm").write_bytes(bytes([index]) * 1000)
    folder = source_identity(series)
    (series / "3.dcm").write_bytes(b"\0" * 10)
    assert source_identity(series) != folder
    (series / "3.dcm").unlink()
    assert source_identity(series) == folder
    (series / ".DS_Store").write_bytes(b"finder")
    assert source_identity(series) == folder, "hidden files are not slices"
