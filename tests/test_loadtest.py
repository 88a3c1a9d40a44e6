"""The load test: its pieces, and a short real run (2 users, a few seconds) against the session's server."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from satseg.checkout import DEFAULT_REPOSITORY
from satseg.server.triton import TritonServer
from satseg_loadtest.metrics import difference, ensemble_requests, model_window, parse_metrics
from satseg_loadtest.scenarios import SCENARIOS, mix_weights
from satseg_loadtest.sweep import with_instances

if importlib.util.find_spec("locust") is None:  # never imported here: it monkey-patches the process for gevent
    pytest.skip("the load test needs the load extra (locust)", allow_module_level=True)

METRICS = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="sat",version="1"} 7
nv_inference_request_success{model="vision",version="1"} 140
nv_inference_request_success{model="prompt_encoder",version="1"} 9
nv_inference_request_failure{model="sat",reason="BACKEND",version="1"} 1
nv_inference_request_failure{model="sat",reason="REJECTED",version="1"} 2
nv_inference_request_duration_us{model="sat",version="1"} 14000000
nv_inference_queue_duration_us{model="vision",version="1"} 7000
nv_cpu_utilization 0.5
"""


def test_metrics_are_parsed_per_model_and_differenced() -> None:
    after, before = parse_metrics(METRICS), parse_metrics(METRICS.replace("} 7\n", "} 5\n"))
    assert after["nv_inference_request_failure"]["sat"] == 3  # summed over reasons
    sat = model_window(difference(after, before), "sat")
    assert (sat.success, sat.failure) == (2, 0)
    assert model_window(after, "sat").mean_request_ms == pytest.approx(2000.0)
    assert model_window(after, "vision").queue_ms == pytest.approx(7.0)
    # The ensemble's failures double-count (Triton 2.51): requests are counted at its first step instead.
    assert (ensemble_requests(after).succeeded, ensemble_requests(after).refused) == (7, 2)


def test_mixes_are_drawn_with_the_asked_malformed_share() -> None:
    assert mix_weights(SCENARIOS["mixed"]) == [0.7, 0.2, 0.1]
    assert mix_weights(SCENARIOS["bad_inputs"], 0.25) == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError):
        mix_weights(SCENARIOS["bad_inputs"], 1.5)


def test_sweep_copies_set_instance_counts(tmp_path: Path) -> None:
    source = tmp_path / "repository"
    shutil.copytree(DEFAULT_REPOSITORY, source, ignore=shutil.ignore_patterns("*.onnx", "*.safetensors", "tokenizer"))
    copy = with_instances(source, tmp_path / "copy", {"segmenter": 2, "vision": 3})
    for model, count in (("segmenter", 2), ("vision", 3)):
        assert re.findall(r"count:\s*(\d+)", (copy / model / "configs" / "cpu.pbtxt").read_text()) == [str(count)]
        assert (source / model / "configs" / "cpu.pbtxt").read_text().count("count: 1") == 1  # original untouched
    with pytest.raises(ValueError, match="instance counts apply"):
        with_instances(source, tmp_path / "other", {"prompt_encoder": 2})


def test_a_short_run_has_no_failures_and_writes_its_reports(triton_server: TritonServer, tmp_path: Path) -> None:
    from satseg_loadtest.run import main as sat_loadtest

    command = ["--url", triton_server.http_url, "--metrics-url", triton_server.metrics_url, "--output", str(tmp_path)]
    command += ["--users", "2", "--spawn-rate", "2", "--duration", "3s", "--scenario", "bad_inputs"]
    command += ["--malformed-share", "0.5"]
    assert sat_loadtest(command) == 0
    (folder,) = tmp_path.iterdir()
    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.html", "summary.md", "throughput.png"):
        assert (folder / name).is_file(), name
    totals = json.loads((folder / "locust_totals.json").read_text())
    assert totals["total"]["requests"] >= 2 and totals["total"]["failures"] == 0
    assert "they agree" in (folder / "summary.md").read_text()


def test_the_dicom_node_load_test_reconciles_exactly_once_delivery(triton_server: TritonServer, tmp_path: Path) -> None:
    """Three JPEG 2000 series from two concurrent associations into a real sat-dicom-node against the served
    model (many PACS send CT compressed): each is segmented and comes back as exactly one SEG, and the
    destination, the node's database and its metrics agree."""
    pytest.importorskip("pynetdicom", reason="the DICOM node needs the pacs extra (pynetdicom)")
    from satseg_loadtest.dicom_node import main as node_load_test

    command = ["--series", "3", "--senders", "2", "--settle-s", "1", "--transfer-syntax", "jpeg2000"]
    command += ["--url", triton_server.grpc_url]
    assert node_load_test([*command, "--output", str(tmp_path)]) == 0
    [folder] = tmp_path.iterdir()
    report = json.loads((folder / "report.json").read_text())
    assert report["exactly_once"] and report["database"] == {"sent": 3}
    assert report["transfer_syntax"] == "JPEG2000Lossless"
    assert sorted(report["segs_per_series"].values()) == [1, 1, 1]
    assert report["metrics"]["sat_dicom_node_instances_received"] == 3 * report["slices_per_series"]
    assert report["node_peak_rss_mb"] > 0 and report["spool_peak_bytes"] > report["bytes_per_series"] // 2
    assert "**yes**" in (folder / "summary.md").read_text()
