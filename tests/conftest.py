"""Fixtures shared by the suite: the real data beside the repo, a tiny checkpoint, and the real served model."""

from __future__ import annotations

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
    from export.build_repo import ExportSettings, build_repository
    from satseg.serving.server import TritonServer

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
