"""``SATClient`` and ``sat-serve`` against the real ``tritonserver`` (the session's server from conftest)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from served import MIN_AGREEMENT, agreement, phantom, reference_masks

from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.outputs import WARNINGS_KEY
from satseg.outputs.writer import LABELMAP_FILE, STATISTICS_FILE, mask_file_name
from satseg.pipeline import Segmenter
from satseg.server.triton import ServerPorts, TritonServer, free_ports
from satseg.text import untrained_warning
from satseg_clients import SATClient, ServerUnavailable
from satseg_clients.sat_client import check_response_size, default_compression, wire_image

pytest.importorskip("tritonclient.grpc")
ORGANS = ["liver", "spleen", "left kidney"]


def flipped(volume: Volume) -> Volume:
    """The same CT stored with its first axis reversed: an oblique affine with a negative determinant."""
    array = np.flip(volume.array, axis=0).copy()
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = volume.shape[0] - 1
    return Volume(array, volume.affine @ flip, volume.modality)


def test_segmentation_is_saved_on_the_input_grid(
    triton_server: TritonServer, demo_reference: Segmenter, tmp_path: Path
) -> None:
    volume = flipped(phantom(seed=6, degrees=25.0))
    assert np.linalg.det(volume.affine[:3, :3]) < 0
    with SATClient(triton_server.grpc_url) as client:
        result = client.segment(volume, ORGANS, "ct", output="both")
    expected = reference_masks(demo_reference, volume, "ct", ORGANS)
    assert expected.any()
    assert result.labels == tuple(ORGANS) and result.masks is not None and result.labelmap is not None
    for index, organ in enumerate(ORGANS):
        assert agreement(result.masks[index], expected[index]) >= MIN_AGREEMENT, organ
        # The label map never claims a voxel for a prompt whose mask excludes it.
        assert not np.any((result.labelmap == index + 1) & (result.masks[index] == 0)), organ
    written = result.save(tmp_path, preview=True)
    assert tmp_path / "preview.png" in written
    for index, organ in enumerate(ORGANS):
        image = nib.load(tmp_path / mask_file_name(organ))
        np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(image.dataobj), result.masks[index])
    labelmap = nib.load(tmp_path / LABELMAP_FILE)
    np.testing.assert_allclose(labelmap.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(labelmap.dataobj), result.labelmap)
    statistics = json.loads((tmp_path / STATISTICS_FILE).read_text())
    np.testing.assert_allclose([statistics[organ]["volume_ml"] for organ in ORGANS], result.volumes_ml, atol=1e-3)


def test_every_transport_gives_identical_masks(triton_server: TritonServer, caplog: pytest.LogCaptureFixture) -> None:
    volume = phantom(seed=7, shape=(36, 30, 18))
    answers = {}
    for protocol, url in (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)):
        transports = [
            ("plain", {"compression": None, "shared_memory": "off"}),
            ("gzip", {"compression": "gzip", "shared_memory": "off"}),
            ("shared memory", {"shared_memory": "on", "admin_key": triton_server.admin_key}),
        ]
        for name, options in transports:
            with SATClient(url, protocol, **options) as client:
                result = client.segment(volume, ORGANS[:2], "ct", output="both")
                assert client.uses_shared_memory == (name == "shared memory")
            answers[protocol, name] = (result.masks, result.labelmap)
    masks, labelmap = answers["grpc", "plain"]
    assert masks is not None and masks.any() and labelmap is not None
    for transport, (other_masks, other_labelmap) in answers.items():
        np.testing.assert_array_equal(other_masks, masks, err_msg=str(transport))
        np.testing.assert_array_equal(other_labelmap, labelmap, err_msg=str(transport))
    with SATClient(triton_server.grpc_url) as client:  # auto, but without the admin key: falls back and says so
        client.segment(volume, ["liver"], "ct")
        assert not client.uses_shared_memory
    assert "shared memory not used" in caplog.text and "admin key" in caplog.text


def test_an_answer_over_the_message_limit_is_refused_before_sending() -> None:
    check_response_size((512, 512, 300), 20, "labelmap")  # 150 MB
    with pytest.raises(SatInputError, match="2 GiB"):
        check_response_size((512, 512, 300), 32, "masks")  # 2.4 GiB


def test_a_refusal_is_one_line_and_an_absent_server_is_unavailable(triton_server: TritonServer) -> None:
    volume = phantom(seed=8, shape=(32, 28, 16))
    with SATClient(triton_server.http_url, "http") as client, pytest.raises(SatInputError, match="livr"):
        client.segment(volume, ["livr"], "ct")
    absent = SATClient(f"127.0.0.1:{free_ports(1)[0]}", retry_budget_s=0.5, backoff_s=0.05)
    assert not absent.is_ready()
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"still unavailable after [3-9] attempt.*retry budget 0.5 s"):
        absent.segment(volume, ["liver"], "ct")
    assert time.monotonic() - started < 3.0
    assert not absent.wait_ready()
    with pytest.raises(SatInputError, match="modality"):
        absent.segment(Volume(volume.array, volume.affine), ["liver"])


def test_wire_format_and_compression_defaults() -> None:
    hounsfield = np.array([[[-1024, 0], [50, 3000]]], dtype=np.int32)
    assert wire_image(hounsfield, "ct").dtype == np.int16
    assert wire_image(hounsfield.astype(np.float32), "ct").dtype == np.float32  # not known to be whole numbers
    assert wire_image(hounsfield * 100, "ct").dtype == np.float32  # beyond int16: never wrapped around
    assert wire_image(hounsfield, "mri").dtype == np.float32
    assert default_compression("127.0.0.1:8001") is None
    assert default_compression("localhost:8001") is None
    assert default_compression("[::1]:8001") is None
    assert default_compression("pacs-ai.hospital.example:8001") == "gzip"


def test_sat_serve_serves_until_sigterm(triton_server: TritonServer, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "satseg.cli.serve", str(triton_server.repository), "--log", str(tmp_path / "log")]
    command += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while process.stdout is not None and not any(line.startswith("Ctrl-C") for line in lines):
            line = process.stdout.readline()
            assert line, f"sat-serve ended before it was ready:\n{''.join(lines)}"
            lines.append(line)
        printed = "".join(lines)
        server_pid = int(re.search(r"ready \(pid (\d+)\)", printed).group(1))  # type: ignore[union-attr]
        http = re.search(r"HTTP +(http://\S+)", printed).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(f"{http}/v2/models/sat/ready", timeout=5) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped (tritonserver exit code 0)" in (process.stdout.read() if process.stdout else "")
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_statistics_need_the_admin_key(triton_server: TritonServer, protocol: str) -> None:
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    with SATClient(url, protocol, retry_budget_s=0) as client:
        models = {entry["name"] for entry in client.inference_statistics(triton_server.admin_key)["model_stats"]}
        assert {"sat", "prompt_encoder", "segmenter", "vision"} <= models
        with pytest.raises(PermissionError):
            client.inference_statistics("not-the-key")


def test_the_client_retries_until_a_restarted_server_answers(triton_server: TritonServer) -> None:
    ports = ServerPorts(*free_ports(3))
    later = TritonServer(triton_server.repository, ports=ports)
    # Nothing listens for the first 10 s, then the server loads (a restart takes about 18 s): the default
    # retry budget must outlast both.
    starter = threading.Timer(10.0, later.start)
    started = time.monotonic()
    starter.start()
    try:
        with SATClient(f"127.0.0.1:{ports.grpc}", shared_memory="off") as client:
            result = client.segment(phantom(seed=9, shape=(32, 28, 16)), ["liver"], "ct")
        assert result.masks is not None and result.masks.shape == (1, 32, 28, 16)
        assert time.monotonic() - started > 10.0
    finally:
        starter.join()
        later.stop()


def test_the_served_answer_says_which_prompts_the_model_was_not_trained_on(
    triton_server: TritonServer, tmp_path: Path
) -> None:
    """The demo knows its trained terms and the parents they make up; "pancreas" is outside them. The warning comes
    back with the answer, in the words sat-segment prints, and into statistics.json and the run's records."""
    client = SATClient(triton_server.grpc_url, shared_memory="off")
    volume = phantom(seed=8, shape=(32, 28, 16))
    known = client.segment(volume, ["liver", "kidney"])
    flagged = client.segment(volume, ["pancreas", "liver"])
    assert known.warnings == ()
    assert flagged.warnings == (untrained_warning(["pancreas"]),)
    flagged.save(tmp_path / "case")
    statistics = json.loads((tmp_path / "case" / STATISTICS_FILE).read_text())
    assert statistics[WARNINGS_KEY] == list(flagged.warnings) and set(statistics) == {"pancreas", "liver", "warnings"}
    known.save(tmp_path / "known")
    assert WARNINGS_KEY not in json.loads((tmp_path / "known" / STATISTICS_FILE).read_text())
