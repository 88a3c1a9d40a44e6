"""sat-dicom-node's parts without a server: the config's refusals, routing, and the job database's rules."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from satseg.errors import SatInputError
from satseg_clients.dicom_node.config import NodeConfig, Route, from_document
from satseg_clients.dicom_node.jobs import COMPLETE, FAILED, RECEIVED, SEGMENTED, SEGMENTING, SENT, JobStore, job_id
from satseg_clients.dicom_node.routing import route
from satseg_clients.dicom_seg import result_uids

MINIMAL = {
    "data_dir": "data",
    "receive": {"allowed_calling_ae_titles": ["ORTHANC"]},
    "route": [{"modality": "CT", "task": "abdomen_organs"}],
}


def test_the_documented_config_loads_and_anchors_paths_at_its_folder() -> None:
    config = NodeConfig.load(Path(__file__).parents[1] / "deploy" / "dicom_node.toml")
    assert config.data_dir == Path(__file__).parents[1] / "deploy" / "dicom_node_data"
    assert config.receive.host == "127.0.0.1"
    assert [rule.task or "skip" for rule in config.routes] == ["abdomen_organs", "brain_structures", "skip"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"receive": {"allowed_calling_ae_titles": ["ORTHANC"], "prot": 1}}, "unknown key 'prot'"),
        ({"receive": {}}, "allowed_calling_ae_titles is empty"),
        ({"route": []}, "no \\[\\[route\\]\\]"),
        ({"route": [{"modality": "CT", "task": "livers"}]}, "unknown task 'livers'"),
        ({"route": [{"modality": "CT"}]}, "either a task or skip"),
        ({"send": {"kind": "ftp"}}, "kind 'ftp' is not one of dimse, dicomweb"),
        ({"send": {"kind": "dicomweb"}}, "needs a \\[send.dicomweb\\]"),
        ({"jobs": {"retention": "forever"}}, "retention 'forever'"),
    ],
)
def test_a_config_that_cannot_work_is_refused_in_one_line(change: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(SatInputError, match=message) as refused:
        from_document({**MINIMAL, **change}, tmp_path)
    assert "\n" not in str(refused.value)


def header(**values: object) -> pydicom.Dataset:
    dataset = pydicom.Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    dataset.Modality = "CT"
    for name, value in values.items():
        setattr(dataset, name, value)
    return dataset


ROUTES = (
    Route(modality="MR", series_description="t1", task="brain_structures", min_slices=20),
    Route(modality="CT", skip=True, body_part="head"),
    Route(modality="CT", min_slices=20, task="abdomen_organs"),
)


@pytest.mark.parametrize(
    ("values", "instances", "task", "reason"),
    [
        ({}, 40, "abdomen_organs", "route 3"),
        ({}, 2, None, "no route matches"),
        ({"BodyPartExamined": "HEAD"}, 40, None, "route 2 skips it"),
        ({"Modality": "MR", "SeriesDescription": "Sag T1 MPRAGE"}, 176, "brain_structures", "route 1"),
        ({"Modality": "MR", "SeriesDescription": "T2 FLAIR"}, 176, None, "no route matches"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 40, None, "localizer series"),
        ({"ImageType": ["LOCALIZER"]}, 40, None, "localizer series"),  # one value: pydicom gives a str
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.67"}, 1, None, "structured report"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, 40, None, "secondary capture"),
    ],
)
def test_routing_takes_the_first_matching_rule_and_skips_what_is_no_volume(
    values: dict, instances: int, task: str | None, reason: str
) -> None:
    decision = route(header(**values), instances, ROUTES)
    assert decision.task == task
    assert reason in decision.reason and "skipped" not in decision.reason  # the job's state says it


def test_status_names_each_state_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``status`` printed ``skipped: skipped: no route matches``: the state, then a reason that repeated it."""
    from satseg_clients.dicom_node.cli import main

    config = tmp_path / "node.toml"
    deployed = (Path(__file__).parents[1] / "deploy" / "dicom_node.toml").read_text()
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n' + deployed.replace("data_dir =", "# data_dir ="))
    store = JobStore(tmp_path / "data" / "jobs.sqlite")
    store.skip_series("9.9", "8.8", "dicomweb", route(header(**{"ImageType": ["LOCALIZER"]}), 3, ROUTES).reason)
    assert main(["status", "--config", str(config)]) == 0
    [last] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("last")]
    assert last == f"last    {job_id('9.9')}  skipped: a localizer series"


def test_an_instance_counts_once_and_a_quiet_series_becomes_complete(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    for instance in ("1.1", "1.2", "1.1"):
        job, _ = store.add_instance("9.9", "8.8", instance, "dimse:A")
    assert (job.instances, job.state) == (2, RECEIVED)
    assert store.complete_settled(settle_s=60) == []
    assert store.complete_settled(settle_s=0) == [job_id("9.9")]
    job, new = store.add_instance("9.9", "8.8", "1.3", "dimse:A")  # a late slice reopens a series not yet taken
    assert (job.state, job.instances, new) == (RECEIVED, 3, True)
    store.add_instance("7.7", "8.8", "2.1", "dicomweb", expected=1)
    assert store.complete_settled(settle_s=3600) == [job_id("7.7")]  # its count is known and reached


def test_a_crash_while_segmenting_requeues_and_a_sent_pair_is_recorded_once(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.add_instance("9.9", "8.8", "1.1", "dimse:A")
    store.move(job.id, SEGMENTING, started=time.time())
    assert store.recover() == [job.id]
    assert store.get(job.id).state == COMPLETE
    job = store.move(job.id, SEGMENTED, model="m1")
    store.record_sent(job, "m1", "2.25.1")
    store.record_sent(job, "m1", "2.25.1")  # sending again after a crash before the record is harmless
    assert store.was_sent("9.9", "m1") and not store.was_sent("9.9", "m2")
    assert store.get(job.id).state == SENT
    assert store.add_instance("9.9", "8.8", "1.4", "dimse:A")[1] is False  # a sent series takes no more
    assert store.counts()[SENT] == 1


def test_a_job_database_of_an_earlier_version_gains_the_spool_column(tmp_path: Path) -> None:
    """A node upgraded in place opens its old jobs.sqlite: the byte count is added, existing jobs count 0."""
    import sqlite3

    from satseg_clients.dicom_node.jobs import SCHEMA

    old = sqlite3.connect(tmp_path / "jobs.sqlite")
    old.executescript(SCHEMA.replace("    bytes INTEGER NOT NULL DEFAULT 0,\n", ""))
    old.close()
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.add_instance("9.9", "8.8", "1.1", "dimse:A", size=1000)
    assert job.bytes == 1000 and store.spool_bytes() == 1000
    store.move(job.id, SENT)
    assert store.spool_bytes() == 0


def test_only_parked_jobs_are_replayed(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.add_instance("9.9", "8.8", "1.1", "dimse:A")
    assert store.replay(job.id).state == RECEIVED
    store.move(job.id, FAILED, reason="two slices", attempts=3)
    replayed = store.replay(job.id)
    assert (replayed.state, replayed.attempts, replayed.reason) == (COMPLETE, 0, None)


def test_result_uids_depend_on_the_source_series_and_the_model_only() -> None:
    assert result_uids("1.2.3", "model-a") == result_uids("1.2.3", "model-a")
    assert result_uids("1.2.3", "model-a") != result_uids("1.2.3", "model-b")
    assert result_uids("1.2.3", "model-a") != result_uids("1.2.4", "model-a")
    series, instance = result_uids("1.2.3", "model-a")
    assert series != instance and pydicom.uid.UID(instance).is_valid


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_the_demo_series_lies_on_the_volume_grid_with_its_affine(modality: str, tmp_path: Path) -> None:
    """``sat-pacs-demo`` sends a NIfTI volume as DICOM: read back, it is the same voxels on the same oblique,
    flipped grid (so the SEG that comes back overlays the original)."""
    import numpy as np

    from satseg.geometry import Volume, load_volume
    from satseg_clients.dicom_node.demo import write_dicom_series

    rotation = np.array([[np.cos(0.4), -np.sin(0.4), 0.0], [np.sin(0.4), np.cos(0.4), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 1.2, -2.5])  # oblique, first and last axes flipped
    affine[:3, 3] = [40.0, -20.0, 15.0]
    rng = np.random.default_rng(3)
    values = rng.integers(-1024, 2000, (12, 10, 6)) if modality == "ct" else rng.random((12, 10, 6)) * 900
    volume = Volume(values.astype(np.int16 if modality == "ct" else np.float32), affine, modality)
    back = load_volume(write_dicom_series(volume, tmp_path / "series", "test"))
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    np.testing.assert_allclose(back.array, volume.array, atol=0 if modality == "ct" else 900 / 65535)
    assert back.modality == modality


def test_the_demo_series_is_written_as_scanners_write_axial_series(tmp_path: Path) -> None:
    """A RAS-stored volume goes out with the orientation 1\\0\\0\\0\\1\\0 (rows to the patient's left, columns
    to the back, slices upward), not -1\\0\\0\\0\\-1\\0, and holds the same world content."""
    import numpy as np
    import pydicom

    from satseg.geometry import Volume, load_volume
    from satseg_clients.dicom_node.demo import scanner_axial, write_dicom_series

    affine = np.diag([1.5, 1.5, 3.0, 1.0])  # RAS+: the NIfTI convention of the shared CT
    values = np.random.default_rng(4).integers(-1000, 1000, (8, 6, 4)).astype(np.int16)
    volume = Volume(values, affine, "ct")
    folder = write_dicom_series(scanner_axial(volume), tmp_path / "series", "test")
    first = pydicom.dcmread(sorted(folder.iterdir())[0])
    np.testing.assert_allclose(first.ImageOrientationPatient, [1, 0, 0, 0, 1, 0])
    back = load_volume(folder)
    world = back.affine @ [2, 3, 1, 1]  # the voxel (2, 3, 1) of the series lies where the volume's same value lies
    index = np.rint(np.linalg.inv(affine) @ world).astype(int)[:3]
    assert back.array[2, 3, 1] == values[tuple(index)]


def test_the_scp_speaks_tls_when_configured_and_refuses_plain_associations(tmp_path: Path) -> None:
    """[receive.tls]: a TLS peer with a certificate from the configured CA is served; a plain one is not."""
    import shutil
    import ssl
    import subprocess

    pynetdicom = pytest.importorskip("pynetdicom")
    from pynetdicom.sop_class import Verification

    from satseg.server.triton import free_ports
    from satseg_clients.dicom_node.config import Receive, Tls
    from satseg_clients.dicom_node.receive import storage_scp

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test certificates")
    for name in ("node", "peer"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.crt")],
            check=True, capture_output=True,
        )  # fmt: skip
    [port] = free_ports(1)
    node_tls = Tls(tmp_path / "node.crt", tmp_path / "node.key", ca=tmp_path / "peer.crt")
    receive = Receive(port=port, allowed_calling_ae_titles=("PEER",), tls=node_tls)
    server = storage_scp(receive, JobStore(tmp_path / "jobs.sqlite"), tmp_path / "incoming")
    try:
        peer = pynetdicom.AE(ae_title="PEER")
        peer.add_requested_context(Verification)
        peer_tls = Tls(tmp_path / "peer.crt", tmp_path / "peer.key", ca=tmp_path / "node.crt")
        context = peer_tls.context(ssl.Purpose.SERVER_AUTH)
        secure = peer.associate("127.0.0.1", port, ae_title="SATNODE", tls_args=(context, "localhost"))
        assert secure.is_established
        assert secure.send_c_echo().Status == 0x0000
        secure.release()
        assert not peer.associate("127.0.0.1", port, ae_title="SATNODE").is_established
    finally:
        server.shutdown()
