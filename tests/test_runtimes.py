"""Graph runtimes in process: sat-segment --runtime onnxruntime|openvino gives PyTorch's masks, and what a runtime
cannot run is refused in one line before anything loads."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_an_int8_graph_runs_in_process_on_the_input_grid(runs: dict[str, Path], tmp_path: Path) -> None:
    """The demo model's vision graph quantized as ``sat-export --int8`` does it (every convolution, calibrated on
    the phantom's windows), run by ``sat-segment --runtime openvino --precision int8 --graph``: masks on the
    input's grid that are the model's own (Dice 0.79 with PyTorch's for the liver here; the phantom's logits sit
    near the threshold, and the gate that decides whether INT8 is offered is sat-export's, on real windows)."""
    pytest.importorskip("nncf", reason="nncf (the export extra) quantizes the graph")
    from satseg.checkpoint import load_checkpoint
    from satseg.geometry import MODALITIES
    from satseg.text import PromptTokenizer, Vocabulary, resolve_text_encoder
    from satseg_export.int8 import CANDIDATES, quantize
    from satseg_export.parity import volume_patches

    sat, metadata = load_checkpoint(DEMO_CHECKPOINT)
    vocabulary = Vocabulary.load()
    terms = vocabulary.resolve_all(PROMPTS)
    tokens = PromptTokenizer(resolve_text_encoder(sat.config.text_encoder))(terms)
    with torch.inference_mode():
        modality = torch.full((len(terms),), MODALITIES.index("ct"))
        queries = sat.encode_prompts(tokens["input_ids"], tokens["attention_mask"], modality).float().numpy()
    volume = phantom(seed=5, shape=(48, 40, 24))
    calibration = volume_patches(volume, "ct", metadata.model_spec(vocabulary), 4).numpy()
    [onnx] = (runs["torch"].parent / "cache" / "graphs").glob("*/vision.onnx")
    graph = quantize(onnx, calibration, queries, CANDIDATES[0], tmp_path / "model.int8.xml")
    assert graph.with_suffix(".bin").is_file()
    image = runs["torch"].parent / "ct.nii.gz"
    args = ["-i", str(image), "-o", str(tmp_path / "int8"), "--modality", "ct", "--prompts", ",".join(PROMPTS)]
    args += ["--runtime", "openvino", "--precision", "int8", "--graph", str(graph), "--quiet"]
    assert segment_cli([*args, "--checkpoint", str(DEMO_CHECKPOINT)]) == 0
    compared = 0
    for term in PROMPTS:
        got, expected = (nib.load(folder / mask_file_name(term)) for folder in (tmp_path / "int8", runs["torch"]))
        assert np.array_equal(got.affine, expected.affine) and got.shape == expected.shape
        both = np.asarray(got.dataobj).astype(bool), np.asarray(expected.dataobj).astype(bool)
        if both[1].sum() >= 200:  # a speck of a few voxels says nothing either way
            assert dice(*both) > 0.6, term
            compared += 1
    assert compared


def test_int8_without_a_gated_graph_is_refused_in_one_line(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No ``--graph``, and no INT8 graph exported for these weights: one line that says how to get one."""
    image = tmp_path / "ct.nii.gz"
    volume = phantom(seed=6, shape=(24, 20, 12))
    nib.save(nib.Nifti1Image(volume.array, volume.affine), image)
    args = ["-i", str(image), "-o", str(tmp_path / "out"), "--modality", "ct", "--prompts", "liver", "--quiet"]
    args += ["--runtime", "openvino", "--precision", "int8", "--checkpoint", str(tiny_checkpoint)]
    assert segment_cli(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sat-segment: error: --precision int8 needs an INT8 graph gated for these weights")
    with pytest.raises(SatInputError, match="int8 runs on openvino only, not onnxruntime"):
        check_runtime("onnxruntime", "int8")
    with pytest.raises(SatInputError, match="precision int8 is for --runtime openvino"):
        check_precision("int8", torch.device("cpu"), "torch")


def test_a_graph_runtime_with_its_prompts_cached_never_imports_the_text_encoder(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """The runs above left the prompts' embeddings beside the graph, keyed by the checkpoint's files: a new
    ``sat-segment --runtime openvino`` process gives the same masks without building the model, so without
    importing transformers (3 s of a 33 s demo run, benchmarks/RESULTS.md)."""
    cache = runs["torch"].parent / "cache"
    assert list((cache / "embeddings").glob("checkpoint-*-ct.safetensors")), "the first run kept its embeddings"
    args = ["-i", str(runs["torch"].parent / "ct.nii.gz"), "-o", str(tmp_path), "--modality", "ct"]
    args += ["--prompts", ",".join(PROMPTS), "--runtime", "openvino", "--quiet", "--checkpoint", str(DEMO_CHECKPOINT)]
    script = (
        "import sys; from satseg.cli.segment import main; code = main(sys.argv[1:]); "
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'transformers')); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, CACHE_VARIABLE: str(cache)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
    for term in PROMPTS:
        got, expected = (nib.load(folder / mask_file_name(term)) for folder in (tmp_path, runs["openvino"]))
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(expected.dataobj)), term


def test_openvino_compiles_the_window_fixed_and_follows_each_change_of_its_shape(runs: dict[str, Path]) -> None:
    """OpenVINO compiles the vision graph for the window and its batch (:data:`OPENVINO_FIXED_AXES`) and again when
    the batch changes, while the prompt count stays free: every call agrees with onnxruntime's."""
    from satseg.runtimes import GraphSession

    [graph] = (runs["torch"].parent / "cache" / "graphs").glob("*/vision.onnx")
    openvino, onnxruntime = (GraphSession(graph, runtime, threads=2) for runtime in ("openvino", "onnxruntime"))
    rng = np.random.default_rng(3)
    for batch, prompts in [(1, 3), (1, 5), (2, 5), (1, 2)]:
        feeds = {
            "image": rng.standard_normal((batch, 1, 96, 96, 32), dtype=np.float32),
            "queries": rng.standard_normal((batch, prompts, 192), dtype=np.float32),
        }
        [got], [expected] = (session.run(feeds, ["logits"]) for session in (openvino, onnxruntime))
        assert got.shape == (batch, prompts, 96, 96, 32)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()))


def test_a_checkpoints_model_is_built_only_for_prompts_its_embedding_cache_lacks(
    runs: dict[str, Path], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A segmenter of a checkpoint that runs its windows in a graph keys its embeddings by the checkpoint's files:
    the first one builds the model to encode a new prompt; a second one, with the same cache folder, answers from
    it without building the model and gets the same queries to the bit. Other weights get another key."""
    from satseg.checkpoint import DeferredCheckpoint
    from satseg.engine.options import InferenceOptions
    from satseg.pipeline import Segmenter

    [graph] = (runs["torch"].parent / "cache" / "graphs").glob("*/vision.onnx")
    options = InferenceOptions(runtime="openvino")

    def segmenter() -> Segmenter:
        return Segmenter(DeferredCheckpoint(DEMO_CHECKPOINT), options=options, graph=graph, cache_dir=tmp_path)

    first = segmenter()
    assert first._model is None
    queries = first.encode(["liver", "spleen"], "ct")
    assert first._model is not None, "a prompt the cache lacks builds the model"
    again = segmenter()
    assert torch.equal(again.encode(["spleen", "liver"], "ct"), queries.flip(0))
    assert again._model is None and again.embeddings.stats.misses == 0
    assert DeferredCheckpoint(tiny_checkpoint).text_key() != DeferredCheckpoint(DEMO_CHECKPOINT).text_key()
