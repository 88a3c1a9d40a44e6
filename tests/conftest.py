"""Fixtures shared by the suite: the real data beside the repo, a tiny checkpoint, and the real served model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from satseg.checkpoint import save_checkpoint
from satseg.model import build_sat
from satseg.text import Vocabulary

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "demo"
MARKERS = {
    "server": "starts a real tritonserver (the served model or one of its own)",
    "export": "exports a whole model repository (ONNX graphs behind the parity gates)",
    "distributed": "runs two training processes under accelerate",
}
"""The slow kinds of test; `pytest -m "not server and not export and not distributed"` runs the fast unit tests."""
MARKED_BY_FIXTURE = {"triton_server": "server", "exported": "export"}
MARKED_BY_MODULE = {
    "test_server_hardening": "server",
    "test_light_client": "server",
    "test_train_distributed": "distributed",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the fixtures it uses and the module it is in (one rule, no per-file boilerplate)."""
    for item in items:
        names = {MARKED_BY_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in MARKED_BY_FIXTURE}
        module = item.module.__name__ if getattr(item, "module", None) else ""
        names |= {MARKED_BY_MODULE[module]} if module in MARKED_BY_MODULE else set()
        for name in sorted(names):
            item.add_marker(name)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests using it skip on a fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("real data not found at ../shared/data (a fresh clone has none; see its README)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``tiny`` checkpoint (seed 0): real code paths, meaningless masks."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny"
    return save_checkpoint(build_sat("tiny"), folder, vocabulary_sha256=Vocabulary.load().sha256)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The real ``tritonserver`` (pip, CPU, loopback, free ports) serving a repository exported from the bundled
    demo model; one for the whole session. Its log is printed when a test failed while it ran."""
    pytest.importorskip("pytriton", reason="the serving tests need the serve extra (nvidia-pytriton)")
    from satseg.server.triton import TritonServer
    from satseg_export.build_repo import ExportSettings, build_repository

    repository = tmp_path_factory.mktemp("served") / "triton_repo"
    build_repository(ExportSettings(checkpoint=DEMO_CHECKPOINT, repository=repository))
    log = repository.parent / "tritonserver.log"
    failed_before = request.session.testsfailed
    with TritonServer(repository, log_path=log) as running:
        yield running
        if request.session.testsfailed > failed_before:
            print(f"--- tritonserver log ({log}) ---\n{running.log_tail(200)}")


@pytest.fixture(scope="session")
def demo_reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The in-process segmenter of the bundled demo model: what served results are compared with."""
    from satseg.pipeline import Segmenter

    return Segmenter.from_checkpoint(DEMO_CHECKPOINT, cache_dir=tmp_path_factory.mktemp("embeddings"))


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    """David Clunie's DICOM validator (Debian's dicom3tools): installed here as root (CI), else skipped."""
    from satseg_clients.dicom_node.orthanc import apt_install

    if shutil.which("dciodvfy") is None and os.geteuid() == 0:
        try:
            apt_install(["dicom3tools"], "apt-get install dicom3tools")
        except RuntimeError as error:
            pytest.skip(str(error))
    found = shutil.which("dciodvfy")
    if found is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    return found


@pytest.fixture(scope="session")
def orthanc_ready() -> None:
    """Orthanc and its DICOMweb plugin are installed: installed here as root (CI), else the test is skipped."""
    from satseg_clients.dicom_node.orthanc import install_orthanc, orthanc_available

    if orthanc_available() and os.geteuid() == 0:
        install_orthanc()
    if reason := orthanc_available():
        pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system's Chromium, for the viewer test: installed here as root (CI, Debian's chromium), else skipped."""
    pytest.importorskip("playwright", reason="the browser test needs the dev extra (playwright)")
    from satseg_clients.dicom_node.orthanc import apt_install
    from satseg_clients.viewer_browser import CHROMIUM_INSTALL_HINT, chromium_executable

    if chromium_executable() is None and os.geteuid() == 0:
        try:
            apt_install(["chromium"], CHROMIUM_INSTALL_HINT)
        except RuntimeError as error:
            pytest.skip(str(error))
    found = chromium_executable()
    if found is None:
        pytest.skip(f"no Chromium ({CHROMIUM_INSTALL_HINT})")
    return found
