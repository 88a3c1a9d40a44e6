"""Graph runtimes in process: sat-segment --runtime onnxruntime|openvino gives PyTorch's masks, and what a runtime
cannot run is refused in one line before anything loads."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DEMO_CHECKPOINT
from served import phantom

from satseg.cli.segment import main as segment_cli
from satseg.engine.options import check_precision
from satseg.errors import SatInputError
from satseg.graph_cache import CACHE_VARIABLE
from satseg.outputs.writer import mask_file_name
from satseg.runtimes import check_runtime, openvino_has_native_bf16

pytestmark = pytest.mark.export  # the first run exports the demo's vision graph into the cache
PROMPTS = ["liver", "spleen", "left kidney"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sat-segment's masks for one oblique phantom CT, one folder per runtime, sharing one graph cache."""
    root = tmp_path_factory.mktemp("runtimes")
    volume = phantom(seed=5, shape=(48, 40, 24))
    path = root / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume.array, volume.affine), path)
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_VARIABLE, str(root / "cache"))
        for runtime in ("torch", "onnxruntime", "openvino"):
            folders[runtime] = root / runtime
            args = ["-i", str(path), "-o", str(folders[runtime]), "--modality", "ct", "--prompts", ",".join(PROMPTS)]
            assert segment_cli([*args, "--runtime", runtime, "--quiet", "--checkpoint", str(DEMO_CHECKPOINT)]) == 0
    assert len(list((root / "cache" / "graphs").glob("*/vision.onnx"))) == 1, "one graph, exported once"
    return folders


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_graph_runtime_gives_pytorchs_masks(runs: dict[str, Path], runtime: str) -> None:
    for term in PROMPTS:
        expected = np.asarray(nib.load(runs["torch"] / mask_file_name(term)).dataobj).astype(bool)
        got = nib.load(runs[runtime] / mask_file_name(term))
        assert expected.any(), f"{term}: the demo finds nothing, the comparison would prove nothing"
        assert dice(np.asarray(got.dataobj).astype(bool), expected) >= 0.99, term
        assert np.array_equal(got.affine, nib.load(runs["torch"] / mask_file_name(term)).affine)


def test_what_a_runtime_cannot_run_is_refused() -> None:
    with pytest.raises(SatInputError, match="unknown runtime 'tensorrt'; accepted: torch, onnxruntime, openvino"):
        check_runtime("tensorrt")
    with pytest.raises(SatInputError, match="bf16 runs on openvino only, not onnxruntime"):
        check_runtime("onnxruntime", "bf16")
    with pytest.raises(SatInputError, match="precision bf16 is for --runtime openvino"):
        check_precision("bf16", torch.device("cpu"), "torch")
    with pytest.raises(SatInputError, match="runs on the CPU, not cuda"):
        check_precision("fp32", torch.device("cuda"), "openvino")
    if not openvino_has_native_bf16():
        with pytest.raises(SatInputError, match="needs a CPU with native BF16"):
            check_runtime("openvino", "bf16")
