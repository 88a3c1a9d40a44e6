"""The model spec travels with the weights: every path puts windows on the grid the checkpoint states.

A copy of the bundled demo whose ``config.json`` states 1.5 mm isotropic voxels, no crop and another CT
window; the same spec in a copy of the served repository's ``sat/metadata.json`` (what ``sat-export``
copies, checked in test_export). In-process, served and evaluated paths must report the model grid that
spec gives this volume, computed here from the volume's own geometry, and give the same masks.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import DEMO_CHECKPOINT
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from served import phantom, served_cpu_runtime

from satseg.checkpoint import CONFIG_FILE, read_metadata
from satseg.cli.segment import main as segment_cli
from satseg.engine.options import InferenceOptions
from satseg.errors import SatInputError
from satseg.geometry import Volume
from satseg.outputs.run_folder import MANIFEST_FILE
from satseg.pipeline import Segmenter
from satseg.server.triton import TritonServer
from satseg.spec import ModelSpec
from satseg.text import Vocabulary
from satseg_clients import SATClient
from satseg_training.evaluate import evaluate_case
from satseg_training.evaluation.cases import EvaluationCase
from satseg_training.evaluation.prompts import Prompt

SPACING_MM = 1.5
CT_WINDOW_HU = (-200.0, 300.0)
PROMPTS = ["liver", "left kidney"]


def stated_spec() -> ModelSpec:
    """The demo's own spec with another grid and CT window."""
    spec = read_metadata(DEMO_CHECKPOINT).model_spec(Vocabulary.load())
    return spec.with_overrides(target_spacing=(SPACING_MM,) * 3, crop_foreground=False, ct_window_hu=CT_WINDOW_HU)


def expected_grid(volume: Volume) -> list[int]:
    """The uncropped model grid of ``volume`` at 1.5 mm, in RAS axis order, from its affine alone."""
    ornt = ornt_transform(io_orientation(volume.affine), axcodes2ornt(("R", "A", "S")))
    extent_mm = np.asarray(volume.shape) * volume.spacing
    return [int(np.rint(extent_mm[int(np.flatnonzero(ornt[:, 0] == axis)[0])] / SPACING_MM)) for axis in range(3)]


@pytest.fixture(scope="module")
def stated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stated") / "demo"
    shutil.copytree(DEMO_CHECKPOINT, folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["spec"] = stated_spec().to_json()
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, Path]:
    ct = phantom(seed=7, shape=(40, 32, 20))
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct.array, ct.affine), path)
    return ct, path


def test_the_stated_grid_differs_from_the_default_one(volume: tuple[Volume, Path]) -> None:
    """Else the checks below could pass on the code's defaults."""
    default = Segmenter.from_checkpoint(DEMO_CHECKPOINT)
    assert list(default.prepare(volume[0], "ct").image.shape) != expected_grid(volume[0])


def test_in_process_served_and_evaluated_paths_use_the_stated_grid_and_window(
    stated_checkpoint: Path, volume: tuple[Volume, Path], triton_server: TritonServer, tmp_path: Path
) -> None:
    ct, path = volume
    grid = expected_grid(ct)

    out = tmp_path / "out"
    args = ["-i", str(path), "-o", str(out), "--modality", "ct", "--prompts", ",".join(PROMPTS), "--quiet"]
    assert segment_cli([*args, "--checkpoint", str(stated_checkpoint)]) == 0
    assert json.loads((out / MANIFEST_FILE).read_text())["model_grid"] == grid

    segmenter = Segmenter.from_checkpoint(stated_checkpoint)
    case = EvaluationCase("phantom", ct, np.zeros(ct.shape, np.uint8), {}, "ct")
    rows = evaluate_case(segmenter, case, [Prompt(term, (term,)) for term in PROMPTS], "input")
    assert {tuple(row["model_grid"]) for row in rows} == {tuple(grid)}

    in_process = segmenter.segment(ct, PROMPTS, "ct").masks
    default_window = stated_spec().with_overrides(ct_window_hu=(-500.0, 1000.0))
    other_window = Segmenter(segmenter.model, metadata=replace(segmenter.metadata, spec=default_window))
    elsewhere = other_window.segment(ct, PROMPTS, "ct").masks
    assert (in_process != elsewhere).any(), "the CT window must change the masks for this test to mean anything"

    repository = tmp_path / "repository"
    shutil.copytree(triton_server.repository, repository)
    metadata = json.loads((repository / "sat" / "metadata.json").read_text())
    metadata["spec"] = stated_spec().to_json()
    (repository / "sat" / "metadata.json").write_text(json.dumps(metadata))
    with TritonServer(repository, log_path=tmp_path / "triton.log") as server, SATClient(server.grpc_url) as client:
        served = client.segment(ct, PROMPTS, "ct")
        assert client.model_spec(PROMPTS[0]) == stated_spec(), "the client reads the served spec back"
    assert list(served.result.model_grid) == grid
    runtime, graph = served_cpu_runtime(repository)  # the server's arithmetic, for masks equal to the voxel
    same_runtime = Segmenter.from_checkpoint(stated_checkpoint, options=InferenceOptions(runtime=runtime), graph=graph)
    assert np.array_equal(served.masks, same_runtime.segment(ct, PROMPTS, "ct").masks)
    assert (served.masks != in_process).mean() < 1e-3, "and PyTorch's differ only at the 0.5 boundary"


def test_a_spec_the_code_cannot_honour_is_refused_in_one_line() -> None:
    values = stated_spec().to_json()
    values["window"]["importance"] = "constant"
    with pytest.raises(SatInputError, match="importance map 'constant' is not supported; use gaussian"):
        ModelSpec.from_json(values)
    values = stated_spec().to_json()
    values["preprocess"]["ct_windw_hu"] = [0, 1]
    with pytest.raises(SatInputError, match=r"unknown PreprocessConfig field\(s\) \['ct_windw_hu'\]"):
        ModelSpec.from_json(values)
