"""Fresh venvs holding a non-editable ``pip install`` of this repository, for the tests of what a user installs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "satseg", "clients", "training", "export", "loadtest")
"""What setuptools packages (pyproject's package-dir), copied so the build never writes into the checkout."""
PIP_TIMEOUT_S = 900


def copy_sources(root: Path) -> Path:
    """The package sources of the checkout, copied under ``root``; returns the copy."""
    source = root / "source"
    source.mkdir()
    for name in PACKAGE_SOURCES:
        if (REPOSITORY / name).is_dir():
            shutil.copytree(REPOSITORY / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPOSITORY / name, source / name)
    return source


def installed_venv(root: Path, requirement: str, *pip_options: str, dependencies_from: Path | None = None) -> Path:
    """A fresh venv under ``root`` with ``pip install [pip_options] requirement`` done in it; where
    ``dependencies_from`` names another venv's site-packages, the new venv also sees the packages there (so a
    full install need not download torch again). Skips where pip cannot reach the package registry."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    if dependencies_from is not None:
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (Path(site) / "dependencies.pth").write_text(f"{dependencies_from}\n")  # appended after its own
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pip_options, requirement]
    done = subprocess.run(install, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if "Could not find a version" in done.stderr or "NewConnectionError" in done.stderr:
            pytest.skip(f"pip cannot reach the package registry to build the venv: {reason}")
        pytest.fail(f"pip install {requirement} failed: {reason}")
    return venv
