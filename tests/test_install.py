"""The full install: a non-editable ``pip install .`` in a fresh venv, run from a folder outside the checkout.

The wheel is built from a copy of the sources; its dependencies (torch and the rest) are those of the suite's
own venv, seen through a ``.pth`` file, so nothing heavy is downloaded again.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from installed import REPOSITORY, copy_sources, installed_venv

from satseg.checkout import BUNDLED_CHECKPOINT

STAGES = ("satseg", "satseg_training", "satseg_export", "satseg_clients", "satseg_loadtest")


@pytest.fixture(scope="module")
def full_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full_install")
    return installed_venv(
        root, str(copy_sources(root)), "--no-deps", dependencies_from=Path(sysconfig.get_path("purelib"))
    )


@pytest.fixture()
def elsewhere(tmp_path: Path) -> Path:
    """A working folder outside the checkout, holding a copy of the bundled demo checkpoint."""
    shutil.copytree(BUNDLED_CHECKPOINT, tmp_path / "demo_checkpoint", ignore=shutil.ignore_patterns("*.md"))
    return tmp_path


def run(venv: Path, command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / command), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_every_package_is_installed_from_the_wheel_under_its_own_name(full_venv: Path, elsewhere: Path) -> None:
    python = str(full_venv / "bin" / "python")
    probe = f"import {', '.join(STAGES)}; print('\\n'.join(m.__file__ for m in ({', '.join(STAGES)})))"
    files = subprocess.run([python, "-c", probe], cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert all(str(full_venv) in line and str(REPOSITORY) not in line for line in files.splitlines())
    for generic in ("training", "export", "clients", "loadtest"):
        assert subprocess.run([python, "-c", f"import {generic}"], cwd=elsewhere, capture_output=True).returncode != 0
    for command in ("sat-train", "sat-export", "sat-dicom-node", "sat-client", "sat-serve"):
        assert run(full_venv, command, "--help", cwd=elsewhere).returncode == 0, command


def test_sat_segment_runs_an_explicit_checkpoint_and_says_where_to_get_one(full_venv: Path, elsewhere: Path) -> None:
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])  # an LPS-flipped grid, kept by the output
    image = np.random.default_rng(0).normal(0.0, 50.0, (40, 36, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine), elsewhere / "ct.nii.gz")
    args = ("-i", "ct.nii.gz", "-o", "out", "--prompts", "liver,spleen", "--modality", "ct", "--quiet")
    done = run(full_venv, "sat-segment", *args, "--checkpoint", "demo_checkpoint", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    (mask,) = (elsewhere / "out").rglob("liver.nii.gz")
    assert nib.load(mask).shape == image.shape and np.allclose(nib.load(mask).affine, affine)
    refused = run(full_venv, "sat-segment", *args, cwd=elsewhere)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "--checkpoint" in refused.stderr and "models/demo" in refused.stderr


def test_sat_serve_and_sat_export_say_in_one_line_what_they_need(full_venv: Path, elsewhere: Path) -> None:
    refused = run(full_venv, "sat-serve", cwd=elsewhere)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "sat-export" in refused.stderr
    built = shutil.ignore_patterns("1", "metadata.json", "export_report.*")  # the configs only, never exported
    shutil.copytree(REPOSITORY / "triton_repo", elsewhere / "repository", ignore=built)
    unexported = run(full_venv, "sat-serve", "repository", cwd=elsewhere)
    assert unexported.returncode != 0 and len(unexported.stderr.strip().splitlines()) == 1
    assert "never exported" in unexported.stderr and "sat-export" in unexported.stderr
    no_configs = run(full_venv, "sat-export", "demo_checkpoint", "--repository", "repository", cwd=elsewhere)
    assert no_configs.returncode != 0 and len(no_configs.stderr.strip().splitlines()) == 1
    assert "triton_repo/" in no_configs.stderr
