"""The real local Orthanc of the PACS demo: upload, read back, refusal of a broken file, C-STORE to a peer."""

from __future__ import annotations

import io
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_series import distinct_hu, write_series

from satseg_clients.dicom_node.orthanc import Orthanc

SHAPE = (8, 6, 4)  # [I, J, K]: 4 slices


@pytest.fixture(scope="module")
def orthanc(orthanc_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for this module (stopping one takes Orthanc about 3 s)."""
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def test_a_series_uploads_and_its_files_come_back(orthanc: Orthanc, tmp_path: Path) -> None:
    write_series(tmp_path / "ct", distinct_hu(SHAPE))
    [series_id] = orthanc.upload_folder(tmp_path / "ct")
    series = {s["ID"]: s for s in orthanc.series()}[series_id]
    assert series["MainDicomTags"]["Modality"] == "CT"
    assert len(series["Instances"]) == SHAPE[2]
    instance = orthanc.get(f"/instances/{series['Instances'][0]}")
    back = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
    assert back.SOPInstanceUID == instance["MainDicomTags"]["SOPInstanceUID"]
    assert back.SeriesInstanceUID == series["MainDicomTags"]["SeriesInstanceUID"]
    studies = orthanc.get("/dicom-web/studies")  # the DICOMweb plugin is loaded
    assert back.StudyInstanceUID in {study["0020000D"]["Value"][0] for study in studies}


def test_an_empty_series_uid_is_refused(orthanc: Orthanc, tmp_path: Path) -> None:
    write_series(tmp_path / "ct", distinct_hu(SHAPE), slices=[0])
    [path] = (tmp_path / "ct").iterdir()
    broken = pydicom.dcmread(path)
    broken.SeriesInstanceUID = ""
    broken.save_as(path)
    before = orthanc.get("/statistics")["CountInstances"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        orthanc.upload(path)
    assert refused.value.code == 400  # "Bad file format; missing StudyInstanceUID, SeriesInstanceUID or ..."
    assert "SeriesInstanceUID" in refused.value.msg
    assert orthanc.get("/statistics")["CountInstances"] == before


def test_after_a_restart_it_stores_to_a_peer_it_was_told_of(orthanc: Orthanc, tmp_path: Path) -> None:
    with Orthanc(tmp_path / "peer", aet="PEER") as peer:
        url, stored = orthanc.url, orthanc.get("/statistics")["CountInstances"]
        orthanc.modalities["peer"] = ("PEER", peer.host, peer.dicom_port)
        orthanc.stop()
        orthanc.start()  # same ports and storage, new config
        assert orthanc.url == url
        assert orthanc.get("/statistics")["CountInstances"] == stored
        write_series(tmp_path / "ct", distinct_hu(SHAPE))
        series_ids = orthanc.upload_folder(tmp_path / "ct")
        job = orthanc.store_to("peer", series_ids)
        assert (job["RemoteAet"], job["InstancesCount"], job["FailedInstancesCount"]) == ("PEER", SHAPE[2], 0)
        [received] = peer.wait_for_series("CT", timeout_s=10)
        sent = orthanc.get(f"/series/{series_ids[0]}")["MainDicomTags"]["SeriesInstanceUID"]
        assert received["MainDicomTags"]["SeriesInstanceUID"] == sent
        assert len(received["Instances"]) == SHAPE[2]
