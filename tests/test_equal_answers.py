"""Every path gives the same answer: ``sat-segment``, the served ensemble (masks, label map, both) and
``sat-evaluate`` run one engine, so masks, label maps, volumes and ``statistics.json`` agree.

The prompts overlap ("kidney" is the union of "left kidney" and "right kidney"), so a path that counted
volumes from the exclusive label map would give "left kidney" fewer voxels than its mask holds. The volume
lies on an oblique grid whose first axis is flipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from conftest import DEMO_CHECKPOINT
from served import phantom, served_cpu_runtime

from satseg import contract
from satseg.cli.segment import main as segment_cli
from satseg.engine.options import InferenceOptions
from satseg.geometry import Volume, load_volume
from satseg.outputs.writer import LABELMAP_FILE, STATISTICS_FILE, mask_file_name
from satseg.pipeline import Segmenter
from satseg.server.triton import TritonServer
from satseg_clients import SATClient
from satseg_training.evaluate import evaluate_case
from satseg_training.evaluation.cases import EvaluationCase
from satseg_training.evaluation.prompts import Prompt

PROMPTS = ["kidney", "left kidney", "liver"]


def flipped(volume: Volume) -> Volume:
    """The same world content with the first voxel axis stored the other way round."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, volume.shape[0] - 1
    return Volume(np.ascontiguousarray(volume.array[::-1]), volume.affine @ flip, volume.modality)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, Path]:
    volume = flipped(phantom(seed=21, shape=(44, 36, 20), degrees=12.0))
    assert np.linalg.det(volume.affine[:3, :3]) < 0 < abs(volume.affine[0, 1])  # flipped and oblique
    path = tmp_path_factory.mktemp("case") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume.array, volume.affine), path)
    return load_volume(path), path


@pytest.fixture(scope="module")
def in_process(
    case: tuple[Volume, Path], triton_server: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """sat-segment's folders (one mask per prompt, and the merged label map), with the runtime and graph the
    server's CPU config runs: the same engine on the same arithmetic must give the same answer."""
    _, path = case
    runtime, graph = served_cpu_runtime(triton_server.repository)
    folders = {}
    for name, extra in (("masks", []), ("labelmap", ["--ml"])):
        folders[name] = tmp_path_factory.mktemp("sat_segment") / name
        args = ["-i", str(path), "-o", str(folders[name]), "--prompts", ",".join(PROMPTS), "--modality", "ct"]
        extra += ["--runtime", runtime] + (["--graph", str(graph)] if runtime != "torch" else [])
        assert segment_cli([*args, "--statistics", "--quiet", *extra]) == 0
    return folders


def read_array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def read_statistics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATISTICS_FILE).read_text())


def assert_same_statistics(found: dict[str, Any], expected: dict[str, Any], path: str) -> None:
    """Equal ``statistics.json`` contents, numbers to float tolerance (pytest.approx takes no nested dicts)."""
    assert found.keys() == expected.keys(), path
    for term, fields in expected.items():
        assert found[term].keys() == fields.keys(), f"{path}: {term}"
        for name, value in fields.items():
            assert found[term][name] == pytest.approx(value, rel=1e-6), f"{path}: {term} {name}"


def test_the_prompts_overlap_so_the_volume_definition_matters(in_process: dict[str, Path]) -> None:
    """Else the equalities below could hold with volumes counted from the label map."""
    left = read_array(in_process["masks"] / mask_file_name("left kidney"))
    kidney = read_array(in_process["masks"] / mask_file_name("kidney"))
    assert left.sum() > 0 and (kidney[left == 1] == 1).all(), "left kidney must lie inside kidney"
    labelmap = read_array(in_process["labelmap"] / LABELMAP_FILE)
    assert int((labelmap == 2).sum()) < int(left.sum()), "the label map gives some left kidney voxels to kidney"
    assert read_statistics(in_process["masks"])["left kidney"]["voxels"] == int(left.sum())


def test_sat_segment_served_and_evaluated_paths_give_one_answer(
    case: tuple[Volume, Path], in_process: dict[str, Path], triton_server: TritonServer, tmp_path: Path
) -> None:
    volume, path = case
    expected_masks = [read_array(in_process["masks"] / mask_file_name(term)) for term in PROMPTS]
    expected_labelmap = read_array(in_process["labelmap"] / LABELMAP_FILE)
    expected = read_statistics(in_process["masks"])
    assert_same_statistics(read_statistics(in_process["labelmap"]), expected, "sat-segment --ml")

    with SATClient(triton_server.grpc_url) as client:
        for output in contract.OUTPUT_CHOICES:
            served = client.segment(path, PROMPTS, "ct", output=output)
            assert served.labels == tuple(PROMPTS)
            if served.masks is not None:
                for term, mask, want in zip(PROMPTS, served.masks, expected_masks, strict=True):
                    assert np.array_equal(mask, want), f"{output}: the served {term} mask differs"
            if served.labelmap is not None:
                assert np.array_equal(served.labelmap, expected_labelmap), f"{output}: the label map differs"
            saved = tmp_path / output
            served.save(saved, statistics=True)
            assert_same_statistics(read_statistics(saved), expected, f"served {output}")
            assert served.volumes_ml.tolist() == pytest.approx([expected[term]["volume_ml"] for term in PROMPTS])

    runtime, graph = served_cpu_runtime(triton_server.repository)
    options = InferenceOptions(runtime=runtime)
    segmenter = Segmenter.from_checkpoint(DEMO_CHECKPOINT, options=options, graph=graph)  # the server's source
    evaluation = EvaluationCase("phantom", volume, np.zeros(volume.shape, np.uint8), {}, "ct")
    rows = evaluate_case(segmenter, evaluation, [Prompt(term, (term,)) for term in PROMPTS], "input")
    assert [row["predicted_ml"] for row in rows] == pytest.approx([expected[term]["volume_ml"] for term in PROMPTS])
