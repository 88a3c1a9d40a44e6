"""sat-dicom-node against a real Orthanc and the real served model: DIMSE in and out, DICOMweb in and out,
a kill -9 mid-job, Triton stopped mid-run, unsegmentable series, files with empty UIDs, and no PHI in logs."""

from __future__ import annotations

import datetime
import io
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_readers import dice, read_series, rtstruct_masks, seg_masks, sr_measurements
from dicom_series import write_series
from served import phantom

from satseg.geometry import load_volume
from satseg.geometry.io import sorted_series_headers
from satseg.server.triton import ServerPorts, TritonServer, free_ports
from satseg_clients.dicom_node.config import NodeConfig, from_document
from satseg_clients.dicom_node.jobs import FAILED, SEGMENTING, SENT, SKIPPED, JobStore, job_id
from satseg_clients.dicom_node.node import Node
from satseg_clients.dicom_node.orthanc import Orthanc
from satseg_clients.dicom_node.receive import CANNOT_UNDERSTAND
from satseg_clients.dicom_node.send import send_result
from satseg_clients.dicom_seg import read_dicom_seg
from satseg_clients.sat_client import SATClient
from satseg_clients.tasks import task

pytest.importorskip("pynetdicom", reason="the DICOM node needs the pacs extra (pynetdicom)")

TASK = "abdomen_organs"
NODE_AET = "SATNODE"
PATIENT_NAME = "Test^Phantom"  # what tests/dicom_series.py writes; must never reach a log
WAIT_S = 240.0


def ct_series(folder: Path, seed: int, shape: tuple[int, int, int] = (40, 36, 12)) -> Path:
    """A synthetic torso CT as an oblique DICOM series (tests/dicom_series.py) at 6 mm, 8 mm apart."""
    hu = np.clip(phantom(seed=seed, shape=shape).array, -1024, None)  # stored as unsigned with intercept -1024
    write_series(folder, hu, pixel_spacing=(6.0, 6.0), slice_gap=8.0)
    return folder


def series_uid(folder: Path) -> str:
    return str(sorted_series_headers(folder)[0][1].SeriesInstanceUID)


def node_document(data: Path, orthanc: Orthanc, node_port: int, triton_url: str, **sections: Any) -> dict:
    """A node config: DIMSE in on ``node_port`` from Orthanc, C-STORE back to it, short waits."""
    document = {
        "data_dir": str(data),
        "receive": {"port": node_port, "allowed_calling_ae_titles": ["ORTHANC"], "settle_s": 1.0},
        "segment": {"triton_urls": [triton_url], "retry_budget_s": 3.0},
        "send": {"kind": "dimse", "ae_title": "ORTHANC", "port": orthanc.dicom_port},
        "jobs": {"first_backoff_s": 0.5, "max_backoff_s": 2.0, "max_attempts": 2},
        "route": [{"modality": "CT", "task": TASK}],
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    return document


@pytest.fixture()
def orthanc_and_port(orthanc_ready: None, tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    """A fresh Orthanc that knows the node (AE SATNODE) on a free port, which the node then listens on."""
    [node_port] = free_ports(1)
    with Orthanc(tmp_path / "orthanc", modalities={"sat": (NODE_AET, "127.0.0.1", node_port)}) as orthanc:
        yield orthanc, node_port


class RunningNode:
    """A node in a thread of this process (its log captured), stopped as SIGTERM would."""

    def __init__(self, config: NodeConfig) -> None:
        self.node = Node(config)
        self.thread = threading.Thread(target=self.node.run, daemon=True)
        self.thread.start()
        assert self.node.listening.wait(timeout=60), "the node did not start listening"

    @property
    def store(self) -> JobStore:
        return self.node.store

    def stop(self) -> None:
        self.node.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(0.1)
    return value


def state_of(store: JobStore, folder: Path) -> str | None:
    """The state of the series' job (a job parked unexpectedly fails the test at once, with its reason)."""
    job = store.get(job_id(series_uid(folder)))
    if job is not None and job.state == FAILED:
        raise AssertionError(f"job {job.id} parked: {job.reason}")
    return job.state if job else None


def segs_of(orthanc: Orthanc, source: str) -> list[pydicom.Dataset]:
    """The SEG instances in Orthanc that reference the source series ``source``."""
    found = []
    for series in orthanc.series_of_modality("SEG"):
        for instance in series["Instances"]:
            seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance)))
            if seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source:
                found.append(seg)
    return found


def rtstructs_of(orthanc: Orthanc, source: str) -> list[pydicom.Dataset]:
    """The RT Structure Sets in Orthanc whose contours lie on the source series ``source``."""
    found = []
    for series in orthanc.series_of_modality("RTSTRUCT"):
        for instance in series["Instances"]:
            rtstruct = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance)))
            study = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            if study.RTReferencedSeriesSequence[0].SeriesInstanceUID == source:
                found.append(rtstruct)
    return found


def check_rtstruct(rtstruct: pydicom.Dataset, seg: pydicom.Dataset, folder: Path) -> None:
    """The RTSTRUCT sits in the source study beside the SEG, and its contours fill the SEG's segments (read back
    by readers we did not write, in world coordinates)."""
    source = sorted_series_headers(folder)[0][1]
    assert rtstruct.StudyInstanceUID == seg.StudyInstanceUID == source.StudyInstanceUID
    assert [str(roi.ROIName) for roi in rtstruct.StructureSetROISequence] == list(task(TASK).prompts)
    volume = load_volume(folder)
    masks = seg_masks(seg, volume)
    filled = rtstruct_masks(rtstruct, read_series(folder), volume)
    for name, mask in zip(task(TASK).prompts, masks, strict=True):
        assert dice(filled[name], mask) >= 0.95, name


def check_seg(seg: pydicom.Dataset, folder: Path, triton_url: str) -> None:
    """The SEG references the series, has one segment per prompt, carries the model's hash and equals the masks
    ``sat-client`` gets for the same series."""
    prompts = task(TASK).prompts
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid(folder)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == list(prompts)
    assert "not for clinical use" in seg.SeriesDescription
    with SATClient(triton_url) as client:
        direct = client.segment(folder, prompts, "ct")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmParameters == f"model={direct.model}"
    masks, labels = read_dicom_seg(seg, folder)
    assert labels == list(prompts)
    np.testing.assert_array_equal(masks, direct.masks)


def test_a_series_c_stored_by_orthanc_comes_back_as_one_seg_of_its_masks(
    triton_server: TritonServer,
    orthanc_and_port: tuple[Orthanc, int],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    orthanc, node_port = orthanc_and_port
    folder = ct_series(tmp_path / "ct", seed=31)
    [metrics_port] = free_ports(1)
    document = node_document(
        tmp_path / "node", orthanc, node_port, triton_server.grpc_url, send={"rtstruct": True, "sr": True}
    )
    config = from_document({**document, "metrics_port": metrics_port}, tmp_path)
    caplog.set_level(logging.DEBUG)
    node = RunningNode(config)
    try:
        [series] = orthanc.upload_folder(folder)
        orthanc.store_to("sat", [series])
        wait_for(lambda: state_of(node.store, folder) == SENT, "sent job")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        node.stop()
    assert "sat_dicom_node_series_sent_total 1.0" in metrics and "sat_dicom_node_queue_length 0.0" in metrics
    assert f"sat_dicom_node_instances_received {float(len(list(folder.iterdir())))}" in metrics
    assert series_uid(folder) not in metrics
    [seg] = segs_of(orthanc, series_uid(folder))
    check_seg(seg, folder, triton_server.grpc_url)
    [rtstruct] = rtstructs_of(orthanc, series_uid(folder))
    check_rtstruct(rtstruct, seg, folder)
    [sr] = [
        pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance)))
        for series in orthanc.series_of_modality("SR")
        for instance in series["Instances"]
    ]
    assert sr.StudyInstanceUID == seg.StudyInstanceUID  # all three under the source study
    reported = sr_measurements(sr)
    assert sorted(reported) == list(range(1, len(task(TASK).prompts) + 1))
    assert all(group["seg"] == seg.SOPInstanceUID for group in reported.values())
    assert not (tmp_path / "node" / "incoming" / job_id(series_uid(folder))).exists()  # retention: sent, deleted
    logged = caplog.text
    assert PATIENT_NAME not in logged and "PHANTOM-1" not in logged
    assert series_uid(folder) not in logged and job_id(series_uid(folder)) in logged


def test_a_series_pulled_over_dicomweb_goes_back_by_stow(
    triton_server: TritonServer, orthanc_and_port: tuple[Orthanc, int], tmp_path: Path, shared_data: Path
) -> None:
    """The real CT (the top 30 slices of the TotalSegmentator example, at 3 mm) uploaded into Orthanc."""
    import nibabel as nib

    orthanc, _ = orthanc_and_port
    hu = np.asarray(nib.load(shared_data / "totalseg" / "example_ct_sm.nii.gz").dataobj).astype(np.int16)
    folder = tmp_path / "ct"
    write_series(folder, hu, pixel_spacing=(3.0, 3.0), slice_gap=3.0, intercept=float(hu.min()))
    web = {"url": orthanc.dicomweb_url}
    document = node_document(tmp_path / "node", orthanc, 0, triton_server.grpc_url, send={"kind": "dicomweb"})
    document["receive"] = {"port": 0, "dicomweb": web, "poll_s": 1.0, "lookback_days": 0}
    document["send"]["dicomweb"] = web
    orthanc.upload_folder(folder)
    node = RunningNode(from_document(document, tmp_path))
    try:
        wait_for(lambda: state_of(node.store, folder) == SENT, "sent job")
        time.sleep(2.5)  # two more polls: the node's own SEG series is seen and skipped, not pulled
    finally:
        node.stop()
    [seg] = segs_of(orthanc, series_uid(folder))
    check_seg(seg, folder, triton_server.grpc_url)
    assert node.store.counts()[SKIPPED] == 1  # the SEG series
    assert node.store.counts()[SENT] == 1


def test_a_series_still_arriving_in_the_pacs_is_pulled_only_once_its_count_holds(
    orthanc_and_port: tuple[Orthanc, int], tmp_path: Path
) -> None:
    """A DICOMweb search that sees a series mid-upload must not take it with the slices it has so far (seen in
    ``just pacs-demo``: a series uploaded by a user was pulled with 3 of its 24 slices, then skipped)."""
    from satseg_clients.dicom_node.receive import dicomweb_client, pull_new_series

    orthanc, _ = orthanc_and_port
    folder = ct_series(tmp_path / "ct", seed=5)
    files = sorted(folder.iterdir())
    document = node_document(tmp_path / "node", orthanc, 0, "unused:1")
    document["receive"] = {"port": 0, "dicomweb": {"url": orthanc.dicomweb_url}, "lookback_days": 0}
    receive = from_document(document, tmp_path).receive
    store, incoming = JobStore(tmp_path / "jobs.sqlite"), tmp_path / "incoming"
    client, counts = dicomweb_client(receive.dicomweb), {}

    def poll() -> int:
        return pull_new_series(receive, store, incoming, client, datetime.date.today, counts)

    for path in files[:4]:
        orthanc.upload(path)
    assert poll() == 0  # first seen: 4 instances
    for path in files[4:]:
        orthanc.upload(path)
    assert poll() == 0  # grown to 12 since the last search
    assert store.get(job_id(series_uid(folder))) is None
    assert poll() == 1  # unchanged: pulled whole
    job = store.get(job_id(series_uid(folder)))
    assert job is not None and job.instances == len(files) == 12


def sr_document(folder: Path, study: str) -> Path:
    """A one-line Basic Text SR in the study: a series no route should ever segment."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), "SR"
    ds.PatientName, ds.PatientID, ds.ValueType = PATIENT_NAME, "PHANTOM-1", "CONTAINER"
    ds.save_as(folder / "sr.dcm", enforce_file_format=True)
    return folder


def test_unsegmentable_series_are_parked_or_skipped_and_the_next_one_completes(
    triton_server: TritonServer, orthanc_and_port: tuple[Orthanc, int], tmp_path: Path
) -> None:
    orthanc, node_port = orthanc_and_port
    one_slice = tmp_path / "one_slice"
    write_series(one_slice, phantom(seed=32, shape=(40, 36, 12)).array, slices=[5])
    good = ct_series(tmp_path / "good", seed=33)
    report = sr_document(tmp_path / "sr", study=str(sorted_series_headers(good)[0][1].StudyInstanceUID))
    config = from_document(node_document(tmp_path / "node", orthanc, node_port, triton_server.grpc_url), tmp_path)
    node = RunningNode(config)
    try:
        for folder in (one_slice, report, good):
            orthanc.store_to("sat", orthanc.upload_folder(folder))
        wait_for(lambda: state_of(node.store, good) == SENT, "sent job")
    finally:
        node.stop()
    parked = node.store.get(job_id(series_uid(one_slice)))
    assert parked is not None
    assert parked.state == FAILED and "1 slice" in parked.reason
    assert (tmp_path / "node" / "incoming" / parked.id).is_dir()  # kept for a replay
    skipped = node.store.get(job_id(str(pydicom.dcmread(report / "sr.dcm").SeriesInstanceUID)))
    assert skipped.state == SKIPPED and "structured report" in skipped.reason
    assert len(segs_of(orthanc, series_uid(good))) == 1
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "satseg_clients.dicom_node.cli",
            "status",
            "--config",
            str(write_toml(config, tmp_path)),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"parked  {parked.id}" in status and "1 slice" in status and "sent 1" in status


def test_empty_uids_and_strangers_are_refused_and_the_node_stays_up(
    triton_server: TritonServer, orthanc_and_port: tuple[Orthanc, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    orthanc, node_port = orthanc_and_port
    folder = ct_series(tmp_path / "ct", seed=34, shape=(24, 20, 4))
    broken = pydicom.dcmread(next(folder.iterdir()))
    broken.SeriesInstanceUID = ""  # as in the TotalSegmentator example series, which Orthanc refuses too
    config = from_document(node_document(tmp_path / "node", orthanc, node_port, triton_server.grpc_url), tmp_path)
    node = RunningNode(config)
    try:
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(Verification)
        assert not stranger.associate("127.0.0.1", node_port, ae_title=NODE_AET).is_established
        misdirected = AE(ae_title="ORTHANC")  # an allowed peer, set up for another node's AE title
        misdirected.add_requested_context(Verification)
        assert not misdirected.associate("127.0.0.1", node_port, ae_title="NOTNODE").is_established
        modality = AE(ae_title="ORTHANC")
        modality.add_requested_context(CTImageStorage)
        association = modality.associate("127.0.0.1", node_port, ae_title=NODE_AET)
        assert association.is_established
        assert association.send_c_store(broken).Status == CANNOT_UNDERSTAND
        association.release()
        orthanc.store_to("sat", orthanc.upload_folder(folder))  # the node still takes good series
        wait_for(lambda: state_of(node.store, folder) == SENT, "sent job")
    finally:
        node.stop()
    assert "its SeriesInstanceUID is empty" in caplog.text
    assert "refused an association from 127.0.0.1:" in caplog.text
    assert "calling AE title 'STRANGER' is not in allowed_calling_ae_titles" in caplog.text
    assert f"it called AE title 'NOTNODE', not this node's '{NODE_AET}'" in caplog.text
    assert node.store.counts()[SENT] == 1 and sum(node.store.counts().values()) == 1


def test_a_seg_sent_twice_is_one_instance_in_the_pacs(orthanc_and_port: tuple[Orthanc, int], tmp_path: Path) -> None:
    """What makes a crash between sending and recording harmless: the result's UIDs depend on its input only."""
    from satseg.geometry import load_volume
    from satseg_clients.dicom_seg import result_uids, write_dicom_seg

    orthanc, node_port = orthanc_and_port
    folder = ct_series(tmp_path / "ct", seed=35, shape=(24, 20, 4))
    masks = (load_volume(folder).array > 0).astype(np.uint8)[None]
    uids = result_uids(series_uid(folder), "model-x")
    config = from_document(node_document(tmp_path / "node", orthanc, node_port, "127.0.0.1:1"), tmp_path)
    for attempt in range(2):
        path = tmp_path / f"seg{attempt}.dcm"
        write_dicom_seg(masks, ["liver"], folder, path, model="model-x", series_uid=uids[0], instance_uid=uids[1])
        send_result(path, config.send, NODE_AET)
    assert len(orthanc.series_of_modality("SEG")) == 1
    assert orthanc.get("/statistics")["CountInstances"] == 1


def write_toml(config: NodeConfig, folder: Path) -> Path:
    """``config`` as a TOML file, for a node in its own process (only the keys these tests set)."""
    receive, segment, send, jobs = config.receive, config.segment, config.send, config.jobs
    lines = [
        f"data_dir = {json.dumps(str(config.data_dir))}",
        "[receive]",
        f"port = {receive.port}",
        f"allowed_calling_ae_titles = {json.dumps(list(receive.allowed_calling_ae_titles))}",
        f"settle_s = {receive.settle_s}",
        "[segment]",
        f"triton_urls = {json.dumps(list(segment.triton_urls))}",
        f"retry_budget_s = {segment.retry_budget_s}",
        "[send]",
        f'ae_title = "{send.ae_title}"',
        f"port = {send.port}",
        "[jobs]",
        f"first_backoff_s = {jobs.first_backoff_s}",
        f"max_backoff_s = {jobs.max_backoff_s}",
        f"max_attempts = {jobs.max_attempts}",
        *(f'[[route]]\nmodality = "{rule.modality}"\ntask = "{rule.task}"' for rule in config.routes),
    ]
    path = folder / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_node(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "satseg_clients.dicom_node.cli", "run", "--config", str(config_path)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def test_kill_9_mid_job_then_a_restart_gives_exactly_one_seg(
    triton_server: TritonServer, orthanc_and_port: tuple[Orthanc, int], tmp_path: Path
) -> None:
    orthanc, node_port = orthanc_and_port
    folder = ct_series(tmp_path / "ct", seed=36, shape=(64, 56, 20))
    config = from_document(node_document(tmp_path / "node", orthanc, node_port, triton_server.grpc_url), tmp_path)
    config_path, log = write_toml(config, tmp_path), tmp_path / "node.log"
    process = start_node(config_path, log)
    store = JobStore(config.data_dir / "jobs.sqlite")
    try:
        wait_for(lambda: "listening on" in log.read_text(), "listening storage SCP", 120)
        orthanc.store_to("sat", orthanc.upload_folder(folder))
        wait_for(lambda: state_of(store, folder) == SEGMENTING, "job being segmented")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process = start_node(config_path, log)
        wait_for(lambda: state_of(store, folder) == SENT, "sent job")
        wait_for(lambda: log.read_text().count("listening on") == 2, "restarted node's SCP", 120)
        time.sleep(2.0)  # time for a duplicate to arrive, if one were sent
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert len(segs_of(orthanc, series_uid(folder))) == 1
    text = log.read_text()
    assert "was being segmented when the node stopped" in text
    assert PATIENT_NAME not in text and series_uid(folder) not in text
    leaked = [
        line
        for line in text.splitlines()
        if any(str(ds.SOPInstanceUID) in line for _, ds in sorted_series_headers(folder))
    ]
    assert not leaked, leaked[:3]


def test_triton_stopped_mid_run_then_restarted_and_the_job_completes(
    triton_server: TritonServer, orthanc_and_port: tuple[Orthanc, int], tmp_path: Path
) -> None:
    orthanc, node_port = orthanc_and_port
    ports = ServerPorts(*free_ports(3))
    folder = ct_series(tmp_path / "ct", seed=37, shape=(64, 56, 20))
    own = TritonServer(triton_server.repository, ports=ports, log_path=tmp_path / "triton.log").start()
    url = f"127.0.0.1:{ports.grpc}"
    config = from_document(node_document(tmp_path / "node", orthanc, node_port, url), tmp_path)
    node = RunningNode(config)
    try:
        orthanc.store_to("sat", orthanc.upload_folder(folder))
        wait_for(lambda: state_of(node.store, folder) == SEGMENTING, "job being segmented")
        own.stop()
        wait_for(lambda: node.store.get(job_id(series_uid(folder))).reason, "wait for the server", 60)
        own = TritonServer(triton_server.repository, ports=ports, log_path=tmp_path / "triton.log").start()
        wait_for(lambda: state_of(node.store, folder) == SENT, "sent job")
    finally:
        node.stop()
        own.stop()
    job = node.store.get(job_id(series_uid(folder)))
    assert job.attempts == 0  # waiting for a server is not a failure
    assert len(segs_of(orthanc, series_uid(folder))) == 1


def associate_when_up(port: int) -> Any:
    """An association of the allowed peer (AE ORTHANC) for CT in explicit VR little endian with a node started in
    its own process, once it listens."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    modality = AE(ae_title="ORTHANC")
    modality.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return wait_for(
        lambda: (a := modality.associate("127.0.0.1", port, ae_title=NODE_AET)).is_established and a,
        "association",
        timeout_s=60,
    )


def test_random_bytes_are_refused_as_such_and_only_the_node_s_lines_reach_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage request whose data set is random bytes behind a valid file meta (what a fuzzer or a broken
    sender makes) is refused as not DICOM, not as "StudyInstanceUID is empty"; and without --verbose the log
    of the real ``sat-dicom-node run`` holds the node's own lines only, none of pydicom's or pynetdicom's."""
    from pydicom.uid import CTImageStorage as CT_STORAGE
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes as they are, unparsed
    [port] = free_ports(1)
    document = {
        "data_dir": str(tmp_path / "node"),
        "receive": {"port": port, "allowed_calling_ae_titles": ["ORTHANC"], "settle_s": 1.0},
        "segment": {"triton_urls": ["127.0.0.1:1"]},
        "send": {"kind": "dimse", "ae_title": "ORTHANC", "port": 1},
        "route": [{"modality": "CT", "task": TASK}],
    }
    config_path = write_toml(from_document(document, tmp_path), tmp_path)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_STORAGE, "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    noise = tmp_path / "noise.dcm"
    buffer = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta)
    noise.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + np.random.default_rng(0).bytes(4096))
    log = tmp_path / "node.log"
    process = start_node(config_path, log)
    try:
        association = associate_when_up(port)
        assert association.send_c_store(noise).Status == CANNOT_UNDERSTAND
        association.release()
        with socket.create_connection(("127.0.0.1", port)) as stray:  # not even DICOM's upper layer
            stray.sendall(b"GET / HTTP/1.1\r\n\r\n" + np.random.default_rng(1).bytes(512))
            time.sleep(1.0)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert any("it is not a DICOM data set" in line for line in lines), lines
    assert not any("is empty" in line for line in lines)
    assert lines and all(" sat-dicom-node: " in line for line in lines), lines


def test_a_series_sent_again_after_its_job_is_done_is_said_once_per_series(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Resending a sent (or parked) series through the real storage SCP: every instance is acknowledged and
    dropped, and the log says so once for the series, with what to do about it; no line per instance."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from satseg_clients.dicom_node.config import Receive
    from satseg_clients.dicom_node.receive import storage_scp

    caplog.set_level(logging.INFO, logger="sat-dicom-node")
    folder = ct_series(tmp_path / "ct", seed=36, shape=(24, 20, 6))
    [port] = free_ports(1)
    store = JobStore(tmp_path / "jobs.sqlite")
    server = storage_scp(Receive(port=port, allowed_calling_ae_titles=("ORTHANC",)), store, tmp_path / "incoming")
    modality = AE(ae_title="ORTHANC")
    modality.add_requested_context(CTImageStorage)
    identifier = job_id(series_uid(folder))
    try:
        for state in (None, SENT, FAILED):
            if state is not None:
                store.move(identifier, state, reason="parked for the test" if state == FAILED else None)
            association = modality.associate("127.0.0.1", port, ae_title=NODE_AET)
            statuses = [association.send_c_store(pydicom.dcmread(path)).Status for path in sorted(folder.iterdir())]
            association.release()
            assert statuses == [0x0000] * 6
    finally:
        server.shutdown()
    again = [record.getMessage() for record in caplog.records if "came again" in record.getMessage()]
    assert again == [
        f"job {identifier}: the series came again after it was taken; its result was sent; its instances are dropped",
        f"job {identifier}: the series came again after it was taken; it is parked; its instances are dropped "
        "(`sat-dicom-node replay <job>` takes it again)",
    ]
    job = store.get(identifier)
    assert job is not None and job.state == FAILED and job.instances == 6


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "JPEGLSLossless", "RLELossless"])
def test_a_compressed_series_is_accepted_and_reads_back_voxel_for_voxel(tmp_path: Path, syntax: str) -> None:
    """Many PACS send CT compressed: a series compressed losslessly (pydicom's encoders) and C-STOREd in that
    transfer syntax by pynetdicom is accepted by the real storage SCP, and the received files read back into
    exactly the original voxels (storescu saw JPEG 2000 and JPEG-LS refused at association, 0006:020e)."""
    from pydicom import uid
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from satseg.geometry import load_volume
    from satseg_clients.dicom_node.config import Receive
    from satseg_clients.dicom_node.receive import storage_scp

    folder = ct_series(tmp_path / "ct", seed=37, shape=(64, 64, 4))  # JPEG 2000 needs 32+ pixels a side
    original = load_volume(folder)
    transfer_syntax = getattr(uid, syntax)
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        dataset.compress(transfer_syntax)
        dataset.save_as(path, enforce_file_format=True)
    [port] = free_ports(1)
    store = JobStore(tmp_path / "jobs.sqlite")
    server = storage_scp(Receive(port=port, allowed_calling_ae_titles=("ORTHANC",)), store, tmp_path / "incoming")
    try:
        modality = AE(ae_title="ORTHANC")
        modality.add_requested_context(CTImageStorage, [transfer_syntax])
        association = modality.associate("127.0.0.1", port, ae_title=NODE_AET)
        assert association.is_established
        assert [association.send_c_store(pydicom.dcmread(p)).Status for p in sorted(folder.iterdir())] == [0] * 4
        association.release()
    finally:
        server.shutdown()
    received = tmp_path / "incoming" / job_id(series_uid(folder))
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in received.iterdir()} == {transfer_syntax}
    volume = load_volume(received)
    assert np.array_equal(volume.array, original.array) and np.allclose(volume.affine, original.affine)


def test_an_instance_under_a_uid_already_held_is_kept_once_or_refused_if_it_differs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same SOP Instance UID twice through the real storage SCP: identical content is acknowledged and kept
    once; other content is refused and the first file kept; each logged once, naming the job, not the UID (a
    different instance silently replaced the earlier file before)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from satseg_clients.dicom_node.config import Receive
    from satseg_clients.dicom_node.receive import instance_path, storage_scp

    caplog.set_level(logging.INFO, logger="sat-dicom-node")
    folder = ct_series(tmp_path / "ct", seed=38, shape=(24, 20, 4))
    first = pydicom.dcmread(sorted(folder.iterdir())[0])
    other = pydicom.dcmread(sorted(folder.iterdir())[0])
    other.PixelData = bytes(len(other.PixelData))  # the same UIDs, other pixels
    [port] = free_ports(1)
    store = JobStore(tmp_path / "jobs.sqlite")
    server = storage_scp(Receive(port=port, allowed_calling_ae_titles=("ORTHANC",)), store, tmp_path / "incoming")
    try:
        modality = AE(ae_title="ORTHANC")
        modality.add_requested_context(CTImageStorage)
        association = modality.associate("127.0.0.1", port, ae_title=NODE_AET)
        statuses = [association.send_c_store(dataset).Status for dataset in (first, first, first, other)]
        association.release()
    finally:
        server.shutdown()
    assert statuses == [0x0000, 0x0000, 0x0000, CANNOT_UNDERSTAND]
    identifier = job_id(str(first.SeriesInstanceUID))
    kept = pydicom.dcmread(instance_path(tmp_path / "incoming", identifier, str(first.SOPInstanceUID)))
    assert kept.PixelData == first.PixelData
    job = store.get(identifier)
    assert job is not None and job.instances == 1
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith(f"job {identifier}")]
    assert sum("came again with the same content; kept once" in line for line in lines) == 1
    assert sum("with other content; the first is kept and this one refused" in line for line in lines) == 1
    assert str(first.SOPInstanceUID) not in caplog.text


def test_past_its_limits_the_spool_answers_out_of_resources_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With max_open_series 1 a second series is refused with A700 (a PACS retries it later) while the first
    one's instances are still taken; under min_free_bytes every instance is refused; each refusal is one log
    line and a count in the node's metrics, by limit (thirty series were all acknowledged before)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from satseg_clients.dicom_node.config import Receive
    from satseg_clients.dicom_node.metrics import Metrics
    from satseg_clients.dicom_node.receive import OUT_OF_RESOURCES, storage_scp

    first = sorted(ct_series(tmp_path / "first", seed=39, shape=(24, 20, 3)).iterdir())
    second = sorted(ct_series(tmp_path / "second", seed=40, shape=(24, 20, 3)).iterdir())
    port, metrics_port = free_ports(2)
    store = JobStore(tmp_path / "jobs.sqlite")
    metrics = Metrics(store, metrics_port)
    statuses = {}
    for name, order in (("open", [first[0], second[0], first[1]]), ("spool", [first[2]]), ("disk", [first[2]])):
        limits = {
            "open": {"max_open_series": 1},
            "spool": {"max_spool_bytes": store.spool_bytes() + first[2].stat().st_size // 2},
            "disk": {"min_free_bytes": 1 << 60},
        }[name]
        receive = Receive(port=port, allowed_calling_ae_titles=("ORTHANC",), **limits)
        server = storage_scp(receive, store, tmp_path / "incoming", metrics=metrics)
        try:
            modality = AE(ae_title="ORTHANC")
            modality.add_requested_context(CTImageStorage)
            association = modality.associate("127.0.0.1", port, ae_title=NODE_AET)
            statuses[name] = [association.send_c_store(pydicom.dcmread(path)).Status for path in order]
            association.release()
        finally:
            server.shutdown()
    assert statuses == {
        "open": [0x0000, OUT_OF_RESOURCES, 0x0000],
        "spool": [OUT_OF_RESOURCES],
        "disk": [OUT_OF_RESOURCES],
    }
    assert store.get(job_id(series_uid(tmp_path / "second"))) is None
    spooled = sum(path.stat().st_size for path in (tmp_path / "incoming").rglob("*.dcm"))
    assert store.spool_bytes() == spooled > 0  # the files of the two instances taken, counted as kept
    for limit in ("max_open_series is 1", "max_spool_bytes is", "min_free_bytes is"):
        assert limit in caplog.text
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        exported = answer.read().decode()
    for limit in ("open_series", "spool_bytes", "free_disk"):
        assert f'sat_dicom_node_instances_refused_total{{limit="{limit}"}} 1.0' in exported
    assert f"sat_dicom_node_spool_bytes {float(spooled)}" in exported


def test_truncated_slices_and_series_past_the_slice_cap_are_refused_at_receipt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real storage SCP: a slice whose Pixel Data is shorter than its Rows x Columns need is refused
    (C000) with one line naming the job, not acknowledged and caught only at segmentation; a series past
    max_instances_per_series is refused from there on, parked once and its files deleted, so it is never
    segmented incomplete. `sat-dicom-node replay` then forgets it, and the series sent again is taken whole."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from satseg_clients.dicom_node.cli import main as node_cli
    from satseg_clients.dicom_node.config import Receive
    from satseg_clients.dicom_node.receive import storage_scp

    caplog.set_level(logging.INFO, logger="sat-dicom-node")
    slices = sorted(ct_series(tmp_path / "ct", seed=42, shape=(24, 20, 4)).iterdir())
    identifier = job_id(series_uid(tmp_path / "ct"))
    truncated = pydicom.dcmread(slices[0])
    truncated.PixelData = truncated.PixelData[:-100]
    [port] = free_ports(1)
    data = tmp_path / "node"
    store = JobStore(data / "jobs.sqlite")

    def send(cap: int, datasets: list[pydicom.Dataset]) -> list[int]:
        receive = Receive(port=port, allowed_calling_ae_titles=("ORTHANC",), max_instances_per_series=cap)
        server = storage_scp(receive, store, data / "incoming")
        try:
            modality = AE(ae_title="ORTHANC")
            modality.add_requested_context(CTImageStorage)
            association = modality.associate("127.0.0.1", port, ae_title=NODE_AET)
            statuses = [association.send_c_store(dataset).Status for dataset in datasets]
            association.release()
            return statuses
        finally:
            server.shutdown()

    whole = [pydicom.dcmread(path) for path in slices]
    assert send(2, [truncated, *whole]) == [CANNOT_UNDERSTAND, 0x0000, 0x0000, CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
    assert f"job {identifier}: refused an instance from ORTHANC: its Pixel Data holds 860 bytes" in caplog.text
    assert "the slice is truncated" in caplog.text
    job = store.get(identifier)
    assert job is not None and job.state == FAILED and "max_instances_per_series (2)" in str(job.reason)
    assert not (data / "incoming" / identifier).exists()
    assert caplog.text.count("past max_instances_per_series") == 1
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{data}"\n[receive]\nport = {port}\nallowed_calling_ae_titles = ["ORTHANC"]\n'
        f'[[route]]\nmodality = "CT"\ntask = "{TASK}"\n'
    )
    assert node_cli(["replay", "--config", str(config), identifier]) == 0
    assert "forgotten; send the series to the node again" in capsys.readouterr().out
    assert send(8, whole) == [0x0000] * 4
    job = store.get(identifier)
    assert job is not None and (job.state, job.instances) == ("received", 4)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_refused_large_instance_never_sits_in_the_node_s_memory(tmp_path: Path) -> None:
    """A 160 MB instance over max_instance_bytes (32 MiB), sent by pynetdicom to the real ``sat-dicom-node run``:
    refused with A700, and the node's peak RSS grows by far less than the instance (it went to disk as it came;
    a refused 300 MB instance raised the node from 331 to 630 MB before)."""

    from satseg_clients.dicom_node.receive import OUT_OF_RESOURCES

    [port] = free_ports(1)
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "node"}"\n[receive]\nport = {port}\nallowed_calling_ae_titles = ["ORTHANC"]\n'
        f'max_instance_bytes = {32 << 20}\n[segment]\ntriton_urls = ["127.0.0.1:1"]\n'
        f'[send]\nae_title = "ORTHANC"\nport = 1\n[[route]]\nmodality = "CT"\ntask = "{TASK}"\n'
    )
    large = pydicom.dcmread(sorted(ct_series(tmp_path / "ct", seed=41, shape=(24, 20, 3)).iterdir())[0])
    large.Rows, large.Columns = 8960, 8960  # 160 MB of 16-bit pixels
    large.PixelData = bytes(8960 * 8960 * 2)
    process = start_node(config, tmp_path / "node.log")
    try:
        association = associate_when_up(port)
        before = peak_rss_mb(process.pid)
        assert association.send_c_store(large).Status == OUT_OF_RESOURCES
        after = peak_rss_mb(process.pid)
        association.release()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert after - before < 32, f"peak RSS {before:.0f} -> {after:.0f} MB for a refused 160 MB instance"
    assert "more than max_instance_bytes" in (tmp_path / "node.log").read_text()
