"""The served model under hostile and unlucky conditions (issue 16): lying JSON shapes, gzip bombs, malformed
JSON, a missing PROMPTS tensor, a killed python-backend process, and the admin key on the console.

The request tests use the session's real server (conftest), whose HTTP port is the front; its own HTTP
endpoint behind the front shows what the front saves it from. Each stub test starts ``sat-serve`` as a real
subprocess on the same repository and kills one stub with SIGKILL, as the OOM killer does.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from served import phantom

from satseg import contract
from satseg.cli.serve import FAILED
from satseg.server.front import MAX_BODY_BYTES, MAX_JSON_BYTES, Refused, check_infer_json, element_count
from satseg.server.triton import TritonServer
from satseg.server.watchdog import SHM, python_stubs
from satseg_clients.sat_client import infer_inputs, request_arrays

pytest.importorskip("pytriton", reason="the serving tests need the serve extra (nvidia-pytriton)")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip

MiB = 1 << 20
ALLOWED_GROWTH = 100 * MiB
"""How much the server's peak RSS may grow while refusing a few-hundred-byte request."""
SMALL_INPUTS = [
    {"name": "AFFINE", "shape": [4, 4], "datatype": "FP64", "data": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]},
    {"name": "MODALITY", "shape": [1], "datatype": "BYTES", "data": ["ct"]},
    {"name": "PROMPTS", "shape": [1], "datatype": "BYTES", "data": ["liver"]},
]
PYTHON_MODELS = ["prompt_encoder", "segmenter", "text_encoder", "vision"]
"""Every model of the CPU configs is a python model, so each has a stub that can die."""
DETECTION_S = 3.0


def lying_request(shape: list[int]) -> bytes:
    """An infer body declaring ``IMAGE_INT16`` of ``shape`` while carrying 3 values (a few hundred bytes)."""
    image = {"name": "IMAGE_INT16", "shape": shape, "datatype": "INT16", "data": [1, 2, 3]}
    return json.dumps({"inputs": [image, *SMALL_INPUTS]}).encode()


def post(address: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """POST ``body`` to ``sat``'s infer endpoint; the status and the JSON answer."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", "/v2/models/sat/infer", body, {"Content-Type": "application/json"} | (headers or {}))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def get_status(url: str) -> tuple[int, str]:
    """GET ``url`` (``host:port/path``): the status and body; status 0 when nothing listens."""
    address, _, path = url.partition("/")
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", f"/{path}")
        response = connection.getresponse()
        return response.status, response.read().decode()
    except OSError:
        return 0, ""
    finally:
        connection.close()


def memory_bytes(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS) of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024  # type: ignore[union-attr]


def post_measured(pid: int, address: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str, int]:
    """:func:`post`, and how many bytes the peak RSS of ``pid`` (the server) grew by meanwhile."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak (VmHWM) to the current RSS
    before = memory_bytes(pid, "VmRSS")
    status, answer = post(address, body, headers)
    return status, answer.get("error", ""), memory_bytes(pid, "VmHWM") - before


def gzip_with_zeros(head: bytes, zeros: int) -> bytes:
    """gzip of ``head`` and then ``zeros`` zero bytes, compressed piecewise (the zeros never exist at once)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: a gzip header
    parts, block = [compressor.compress(head)], bytes(16 * MiB)
    for start in range(0, zeros, len(block)):
        parts.append(compressor.compress(block[: min(len(block), zeros - start)]))
    return b"".join([*parts, compressor.flush()])


def test_front_counts_values_and_refuses_malformed_json() -> None:
    assert element_count([[1, 2], [3, [4, 5]]]) == 5
    assert element_count("one") == 1
    check_infer_json(json.dumps({"inputs": [{"name": "A", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}).encode())
    binary = {"name": "A", "shape": [9], "parameters": {"binary_data_size": 18}}  # no data: the server checks it
    check_infer_json(json.dumps({"inputs": [binary]}).encode())
    for bad, reason in (
        (lying_request([500, 1000, 1000]), "declares 500000000 values but data holds 3"),
        (b'{"inputs": [', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"inputs": [{"name": "A", "shape": [-1], "data": []}]}', "non-negative integers"),
    ):
        with pytest.raises(Refused, match=reason):
            check_infer_json(bad)


def test_a_376_byte_json_request_is_refused_without_the_allocation(triton_server: TritonServer) -> None:
    bomb = lying_request([500, 1000, 1000])
    assert len(bomb) < 400  # the request was 376 bytes
    status, error, growth = post_measured(triton_server.pid or 0, triton_server.http_url, bomb)
    assert status == 400 and "declares 500000000 values but data holds 3" in error
    assert growth < ALLOWED_GROWTH, f"peak RSS grew {growth / MiB:.0f} MiB"
    # The control: straight to the server, a smaller lie (300 MB of INT16) is allocated before it is refused.
    lie = lying_request([150, 1000, 1000])
    status, error, growth = post_measured(triton_server.pid or 0, triton_server.triton_http_url, lie)
    assert status == 500 and growth > 2 * ALLOWED_GROWTH, f"peak RSS grew {growth / MiB:.0f} MiB"
    assert triton_server.is_ready()


def test_a_gzip_bomb_is_refused_before_the_server_inflates_it(triton_server: TritonServer) -> None:
    voxels = 150_000_000  # 300 MB of zeros in well under 1 MB of gzip
    image = {"name": "IMAGE_INT16", "shape": [150, 1000, 1000], "datatype": "INT16"}
    header = json.dumps({"inputs": [{**image, "parameters": {"binary_data_size": 2 * voxels}}, *SMALL_INPUTS]})
    body = gzip_with_zeros(header.encode(), 2 * voxels)
    assert len(body) < MiB
    headers = {"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(len(header))}
    status, error, growth = post_measured(triton_server.pid or 0, triton_server.http_url, body, headers)
    assert status == 400 and f"limited to {MAX_BODY_BYTES >> 20} MiB" in error
    assert growth < ALLOWED_GROWTH, f"peak RSS grew {growth / MiB:.0f} MiB"


def test_a_json_part_over_the_limit_is_refused(triton_server: TritonServer) -> None:
    values = MAX_JSON_BYTES // 2 + 1  # "0," per value
    image = {"name": "IMAGE", "shape": [values], "datatype": "FP32", "data": [0] * values}
    status, answer = post(triton_server.http_url, json.dumps({"inputs": [image]}, separators=(",", ":")).encode())
    assert status == 400 and f"limited to {MAX_JSON_BYTES >> 20} MiB" in answer["error"]
    headers = {"Inference-Header-Content-Length": str(MAX_JSON_BYTES + 1)}
    status, answer = post(triton_server.http_url, b"{}", headers)
    assert status == 400 and f"limited to {MAX_JSON_BYTES >> 20} MiB" in answer["error"]


def test_malformed_json_gets_400_with_one_line(triton_server: TritonServer) -> None:
    assert post(triton_server.triton_http_url, b'{"inputs": [')[0] == 500  # Triton 2.51's own answer
    status, answer = post(triton_server.http_url, b'{"inputs": [')
    assert status == 400 and "not valid JSON" in answer["error"] and "\n" not in answer["error"]


def test_a_tiny_real_inference_passes_the_front_and_check_answers(triton_server: TritonServer) -> None:
    command = [*sat_serve(), "--check", f"http://{triton_server.http_url}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*sat_serve(), "--check", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "check failed" in done.stderr


def test_a_request_without_prompts_gets_one_line_invalid_arg(triton_server: TritonServer) -> None:
    volume = phantom(seed=2, shape=(16, 16, 8))
    arrays = request_arrays(volume.array, volume.affine, "ct", ["liver"])
    del arrays[contract.PROMPTS]
    with pytest.raises(InferenceServerException) as caught:
        grpcclient.InferenceServerClient(triton_server.grpc_url).infer("sat", infer_inputs(grpcclient, arrays))
    assert "INVALID_ARG" in str(caught.value.status())
    assert "input PROMPTS is missing" in caught.value.message() and "deadlock" not in caught.value.message()


def sat_serve() -> list[str]:
    """The installed ``sat-serve`` beside this interpreter (what users run), else the module."""
    script = Path(sys.executable).with_name("sat-serve")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "satseg.cli.serve"]


def ready_banner(process: subprocess.Popen[str]) -> str:
    """sat-serve's output up to the end of its ready banner."""
    lines: list[str] = []
    while not any(line.startswith("Ctrl-C") for line in lines):
        line = process.stdout.readline() if process.stdout else ""
        assert line, f"sat-serve ended before it was ready:\n{''.join(lines)}"
        lines.append(line)
    return "".join(lines)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


@pytest.mark.parametrize("model", PYTHON_MODELS)
def test_a_killed_stub_fails_the_probes_and_sat_serve_exits(
    triton_server: TritonServer, model: str, tmp_path: Path
) -> None:
    command = [*sat_serve(), str(triton_server.repository), "--log", str(tmp_path / "log")]
    command += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    environment = {key: value for key, value in os.environ.items() if key != "SAT_ADMIN_KEY"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        banner = ready_banner(process)
        server_pid = int(re.search(r"ready \(pid (\d+)\)", banner).group(1))  # type: ignore[union-attr]
        http = re.search(r"HTTP +http://(\S+)", banner).group(1)  # type: ignore[union-attr]
        # The random admin key is on tritonserver's command line (Triton takes it no other way), never printed.
        argv = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode()
        key = re.search(r"sat-admin-key=([0-9a-f]+)", argv).group(1)  # type: ignore[union-attr]
        assert key not in banner and "not shown" in banner
        stubs = python_stubs(server_pid)
        assert sorted(stub.model for stub in stubs) == PYTHON_MODELS
        regions = [SHM / stub.region for stub in stubs]
        assert all(region.exists() for region in regions)
        assert get_status(f"{http}/v2/models/sat/ready")[0] == 200
        victim = next(stub for stub in stubs if stub.model == model)
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        statuses = {}
        while time.monotonic() - killed < DETECTION_S and len(statuses) < 2:
            for path in ("v2/models/sat/ready", "v2/health/live"):
                status, body = get_status(f"{http}/{path}")
                if status == 503:
                    assert repr(model) in body
                    statuses[path] = status
            time.sleep(0.1)
        assert len(statuses) == 2, f"the probes still pass {DETECTION_S} s after the {model} stub was killed"
        assert process.wait(30) == FAILED
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read() if process.stdout else ""
    assert len(re.findall(rf"error: the python-backend process of model '{model}' .* died", output)) == 1, output
    assert not alive(server_pid) and not any(alive(stub.pid) for stub in stubs)
    assert [region for region in regions if region.exists()] == []
