"""The light client: ``pip install ".[client]"`` in a fresh venv gives ``sat-client`` and ``SATClient``
without torch, MONAI or transformers, and it segments a real CT against the session's server.

The venv is built from PyPI (the registry every machine here reaches); where pip cannot reach it, the test
skips and says so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from installed import copy_sources, installed_venv

from satseg.server.triton import TritonServer

HEAVY = ("torch", "monai", "transformers", "scipy", "safetensors")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding ``satseg[client]`` only."""
    root = tmp_path_factory.mktemp("light_client")
    return installed_venv(root, f"{copy_sources(root)}[client]")


def test_the_client_venv_has_no_engine(client_venv: Path) -> None:
    python = str(client_venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    probe = (
        "import sys, satseg_clients, satseg_clients.cli, satseg.geometry, satseg.contract; print(sorted(sys.modules))"
    )
    loaded = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert not [name for name in HEAVY if f"'{name}'" in loaded]
    refused = subprocess.run([str(client_venv / "bin" / "sat-segment"), "--help"], capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().startswith("sat-segment: error: this command needs the engine")
    assert len(refused.stderr.strip().splitlines()) == 1


def test_the_client_install_claims_no_generic_names_and_runs_outside_the_checkout(
    client_venv: Path, tmp_path: Path
) -> None:
    python = str(client_venv / "bin" / "python")
    for generic in ("training", "export", "clients", "loadtest"):
        assert subprocess.run([python, "-c", f"import {generic}"], cwd=tmp_path, capture_output=True).returncode != 0
    helped = subprocess.run([str(client_venv / "bin" / "sat-client"), "--help"], cwd=tmp_path, capture_output=True)
    assert helped.returncode == 0 and b"--prompts" in helped.stdout


def test_sat_client_from_the_light_venv_segments_a_real_ct(
    client_venv: Path, triton_server: TritonServer, shared_data: Path, tmp_path: Path
) -> None:
    ct = nib.load(shared_data / "totalseg" / "example_ct.nii.gz")
    slab = ct.slicer[:, :, 40:72]  # a real CT, thin enough to stay quick; the slicer keeps the world affine
    path = tmp_path / "ct_slab.nii.gz"
    nib.save(slab, path)
    out = tmp_path / "out"
    command = [str(client_venv / "bin" / "sat-client"), "-i", str(path), "-o", str(out), "--prompts", "liver"]
    done = subprocess.run(
        [*command, "--modality", "ct", "--url", triton_server.grpc_url, "--statistics"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (mask_path,) = out.rglob("liver.nii.gz")
    mask = nib.load(mask_path)
    assert mask.shape == slab.shape and np.allclose(mask.affine, slab.affine)
    assert np.asarray(mask.dataobj).sum() > 0, "the demo model finds the liver on the CT it was trained on"
