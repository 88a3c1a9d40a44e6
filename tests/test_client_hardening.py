"""``sat-client`` and ``SATClient`` against hostile or changing inputs (issue 16, client side), on the session's
real server from conftest: resume that checks what it skips, local refusals, one modality rule, size limits."""

from __future__ import annotations

import gzip
import json
import resource
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from served import phantom

from clients import SATClient
from clients.cli import main as sat_client
from clients.folder_run import REPORT_FILE
from clients.sat_client import backoff_delay
from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.geometry.io import check_intensities
from satseg.geometry.volume import MODALITIES, choose_modality
from satseg.outputs.nifti import save_nifti_exact
from satseg.serving.server import TritonServer, free_ports

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
        assert model_requests(observer, "sat") == before + 1, "a refusal is never retried"
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
