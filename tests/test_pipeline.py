"""The whole in-process path: geometry, windows and inverse around a predictor."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from satseg.engine import WindowRun, keep_largest_component, probabilities_on_input_grid
from satseg.engine.options import InferenceOptions
from satseg.engine.preprocess import prepare
from satseg.geometry import Volume
from satseg.phantom import world_coordinates
from satseg.pipeline import Segmenter
from satseg.spec import PreprocessConfig, WindowSpec

TINY_WINDOW = WindowSpec(patch_size=(96, 96, 32))
CPU = torch.device("cpu")


def oblique_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float], flip: bool) -> np.ndarray:
    """Rotated about two axes, anisotropic, optionally flipped on the first axis, centred at the origin."""
    direction = Rotation.from_euler("zx", [27, -19], degrees=True).as_matrix()
    if flip:
        direction = direction @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def sphere_volume(flip: bool, centre=(8.0, -6.0, 5.0), radius: float = 22.0) -> tuple[Volume, np.ndarray, np.ndarray]:
    """A CT with a 400 HU sphere in 0 HU tissue inside air: ``(volume, sphere mask, centre)``."""
    shape = (64, 80, 48)
    affine = oblique_affine(shape, (1.6, 1.3, 2.2), flip)
    world = world_coordinates(shape, affine)
    sphere = np.linalg.norm(world - np.array(centre, dtype=np.float32), axis=-1) <= radius
    image = np.zeros(shape, dtype=np.int16)
    image[:4], image[-4:] = -1000, -1000  # air slabs, so the foreground crop really crops
    image[sphere] = 400
    return Volume(image, affine, modality="ct"), sphere, np.array(centre)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    indices = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ indices + affine[:3, 3]


@pytest.mark.parametrize("flip", [False, True], ids=["oblique", "oblique-flipped"])
def test_oracle_sphere_comes_back_at_its_world_position(flip: bool) -> None:
    """A "model" that segments the sphere in the resampled grid; the pipeline must map it home."""
    volume, painted, centre = sphere_volume(flip)
    model_grid = prepare(volume, "ct", PreprocessConfig()).image
    threshold = float(model_grid.max() + model_grid.median()) / 2

    def oracle(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        inside = 40.0 * (patches - threshold)  # [B, 1, h, w, d]
        return inside.expand(-1, queries.shape[1], -1, -1, -1)

    queries = torch.zeros(2, 8)
    prepared = prepare(volume, "ct", PreprocessConfig())
    results = dict(probabilities_on_input_grid(prepared, queries, oracle, TINY_WINDOW, WindowRun()))
    assert sorted(results) == [0, 1]
    mask = (results[0] > 0.5).numpy()
    assert mask.shape == volume.shape
    assert dice(mask, painted) >= 0.95
    assert np.linalg.norm(world_centroid(mask, volume.affine) - centre) < 1.0
    assert np.linalg.norm(world_centroid(painted, volume.affine) - centre) < 1.0


def test_a_shifted_oracle_fails_the_same_check() -> None:
    """The Dice gate can fail: a one-voxel shift on the model grid already costs accuracy."""
    volume, painted, _ = sphere_volume(False)
    model_grid = prepare(volume, "ct", PreprocessConfig()).image
    threshold = float(model_grid.max() + model_grid.median()) / 2

    def shifted_oracle(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return (40.0 * (patches - threshold)).roll(shifts=4, dims=2)

    prepared = prepare(volume, "ct", PreprocessConfig())
    ((_, probabilities),) = probabilities_on_input_grid(
        prepared, torch.zeros(1, 8), shifted_oracle, TINY_WINDOW, WindowRun()
    )
    assert dice((probabilities > 0.5).numpy(), painted) < 0.95


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    cache = tmp_path_factory.mktemp("embeddings")
    return Segmenter.from_checkpoint(tiny_checkpoint, cache_dir=cache, options=InferenceOptions(prompts_per_pass=2))


def test_segmenter_streams_prompts_on_the_input_grid(segmenter: Segmenter) -> None:
    volume, _, _ = sphere_volume(True)
    terms = segmenter.resolve_prompts(["Liver", "kidney_left", "spleen"])
    assert terms == ["liver", "left kidney", "spleen"]
    results = list(segmenter.probabilities(volume, terms, "ct"))
    assert [(result.index, result.term) for result in results] == [(0, "liver"), (1, "left kidney"), (2, "spleen")]
    for result in results:
        assert result.probabilities.shape == volume.shape
        assert result.probabilities.dtype == torch.float32
        assert float(result.probabilities.min()) >= 0.0 and float(result.probabilities.max()) <= 1.0


def test_prompt_passes_do_not_change_results(segmenter: Segmenter, tiny_checkpoint) -> None:
    """Three prompts in passes of two give what one pass of three gives."""
    volume, _, _ = sphere_volume(False)
    terms = ["liver", "left kidney", "spleen"]
    in_passes = [result.probabilities for result in segmenter.probabilities(volume, terms, "ct")]
    one_pass = Segmenter(segmenter.model, options=InferenceOptions(prompts_per_pass=3))
    together = [result.probabilities for result in one_pass.probabilities(volume, terms, "ct")]
    for a, b in zip(in_passes, together, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_known_prompts_never_run_the_encoder_twice(segmenter: Segmenter) -> None:
    first = segmenter.encode(["liver", "spleen"], "ct")
    misses = segmenter.embeddings.stats.misses
    again = segmenter.encode(["spleen", "liver"], "ct")
    assert segmenter.embeddings.stats.misses == misses
    assert torch.equal(again, first.flip(0))
    mri = segmenter.encode(["liver"], "mri")
    assert not torch.equal(mri[0], first[0]), "the modality embedding must change the query"


def test_a_parent_prompt_is_the_union_of_its_trained_children(segmenter: Segmenter) -> None:
    volume, _, _ = sphere_volume(False)
    trained = Segmenter(
        segmenter.model,
        metadata=dataclasses.replace(segmenter.metadata, extra={"trained_terms": ["left kidney", "right kidney"]}),
    )
    assert trained.components("kidney") == ["left kidney", "right kidney"]
    assert segmenter.components("kidney") == ["kidney"], "unknown training terms: the parent is asked as is"
    terms = ["kidney", *trained.components("kidney")]
    parent, left, right = (result.probabilities for result in trained.probabilities(volume, terms, "ct"))
    torch.testing.assert_close(parent, torch.maximum(left, right))


def test_single_body_structures_keep_their_largest_piece(segmenter: Segmenter) -> None:
    """liver is one connected body in the vocabulary, kidney (both kidneys) is not."""
    assert segmenter.vocabulary.is_single_component("liver")
    assert not segmenter.vocabulary.is_single_component("kidney")
    volume, _, _ = sphere_volume(False)
    options = InferenceOptions(threshold=0.5)
    cleaned = Segmenter(segmenter.model, options=options)
    raw = Segmenter(segmenter.model, options=dataclasses.replace(options, keep_largest_component=False))
    raw_liver, raw_kidney = (result.probabilities for result in raw.probabilities(volume, ["liver", "kidney"], "ct"))
    liver, kidney = (result.probabilities for result in cleaned.probabilities(volume, ["liver", "kidney"], "ct"))
    pieces = ndimage.label((raw_liver > 0.5).numpy(), structure=np.ones((3, 3, 3)))[1]
    assert pieces > 1, "the random model's raw liver mask must have pieces to remove for this test to mean anything"
    torch.testing.assert_close(liver, keep_largest_component(raw_liver.clone(), 0.5), atol=0, rtol=0)
    assert ndimage.label((liver > 0.5).numpy(), structure=np.ones((3, 3, 3)))[1] == 1
    torch.testing.assert_close(kidney, raw_kidney, atol=0, rtol=0)
    lower = Segmenter(segmenter.model, options=dataclasses.replace(options, threshold=0.3))
    assert [result.threshold for result in lower.probabilities(volume, ["liver", "kidney"], "ct")] == [0.3, 0.3]


def test_the_gpu_check_script_runs_on_the_cpu(tmp_path: Path) -> None:
    """``scripts/gpu_check.sh --dry-run``: the GPU run's script, imports and report, on the tiny model here."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in (tmp_path / "gpu_check.txt").read_text()


def test_by_default_every_prompt_that_fits_the_pass_budget_shares_one_pass_over_the_windows() -> None:
    """Each pass runs every window through the predictor (the vision backbone included): 40 prompts on a small
    grid take one pass by default, where a fixed 32 a pass took two; ``prompts_per_pass`` still caps a pass, a
    grid whose one map exceeds the budget still gets one prompt a pass, and nano's large windows count."""
    from satseg.engine.run import PASS_BYTES, WINDOW_LOGIT_COPIES

    volume, _, _ = sphere_volume(False)
    prepared = prepare(volume, "ct", PreprocessConfig())
    calls = []

    def counting(patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        calls.append(queries.shape[1])
        return torch.zeros(patches.shape[0], queries.shape[1], *patches.shape[2:])

    queries = torch.zeros(40, 8)
    assert len(dict(probabilities_on_input_grid(prepared, queries, counting, TINY_WINDOW, WindowRun()))) == 40
    windows = len(calls)
    assert set(calls) == {40}
    calls.clear()
    dict(probabilities_on_input_grid(prepared, queries, counting, TINY_WINDOW, WindowRun(prompts_per_pass=32)))
    assert len(calls) == 2 * windows and sorted(set(calls)) == [8, 32]
    window_bytes = 96 * 96 * 32 * 4 * WINDOW_LOGIT_COPIES
    assert WindowRun().pass_size((100, 100, 100), (96, 96, 32)) == PASS_BYTES // (2_000_000 + window_bytes)
    assert WindowRun().pass_size((2000, 2000, 1000), (96, 96, 32)) == 1
    # nano: a 366x294x112 grid and 288x288x96 windows, whose logits dominate: about the 32 a pass it had
    assert 30 <= WindowRun().pass_size((366, 294, 112), (288, 288, 96)) <= 40
