"""Fixtures shared by the suite: the real data beside the repo, and a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satseg.checkpoint import save_checkpoint
from satseg.model import build_sat
from satseg.text import Vocabulary

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
