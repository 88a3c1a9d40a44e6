"""What ``sat-client -i`` names, as cases: a NIfTI file, a DICOM series folder, a zip of one, or a folder of them.

A folder is one DICOM series when it holds files and no sub-folder, NIfTI or zip; otherwise each visible
entry in it is a case (an entry of an unknown kind fails as its own case, so nothing is skipped silently).
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from satseg.errors import SatInputError
from satseg.geometry import Volume, load_volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ZIP_SUFFIX = ".zip"
MAX_UNZIPPED_BYTES = 8 << 30
"""A zip that would unpack to more than this is refused (a zip bomb, or not one series)."""


@dataclass(frozen=True)
class Case:
    """One volume to segment.

    Attributes:
        index: 1-based position in the run (what logs show instead of names).
        name: the output folder's name, from the input's name without its extension.
        source: the NIfTI file, DICOM folder or zip.
    """

    index: int
    name: str
    source: Path

    @property
    def is_dicom(self) -> bool:
        return self.source.is_dir() or self.source.name.lower().endswith(ZIP_SUFFIX)


def is_case_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((*NIFTI_SUFFIXES, ZIP_SUFFIX))


def is_series_folder(path: Path) -> bool:
    """A folder of plain files only (the slices of one series, perhaps with stray non-DICOM files)."""
    entries = [entry for entry in path.iterdir() if not entry.name.startswith(".")]
    return bool(entries) and not any(entry.is_dir() or is_case_file(entry) for entry in entries)


def case_name(path: Path) -> str:
    """``ct.nii.gz`` -> ``ct``; names are kept to characters safe in any file system."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, ZIP_SUFFIX):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def discover_cases(path: Path) -> list[Case]:
    """The cases of ``path``, sorted by name; an output name is never used twice."""
    if not path.exists():
        raise SatInputError(f"no such file or folder: {path}")
    if path.is_file() or is_series_folder(path):
        entries = [path]
    else:
        entries = sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
        if not entries:
            raise SatInputError(f"folder {path} is empty; expected NIfTI files, DICOM series folders or zips")
    cases: list[Case] = []
    used: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        name = case_name(entry)
        unique = name
        while unique in used:
            unique = f"{name}_{len(used)}"
        used.add(unique)
        cases.append(Case(index, unique, entry))
    return cases


@contextmanager
def opened_case(case: Case, work_dir: Path) -> Iterator[tuple[Volume, Path | None]]:
    """The case's volume and, for DICOM, the folder holding its series (for DICOM SEG output).

    A zip is unpacked into ``work_dir`` (inside the output folder: nothing is written elsewhere) and removed
    on exit.
    """
    if case.source.is_dir():
        yield load_volume(case.source), case.source
    elif case.source.name.lower().endswith(ZIP_SUFFIX):
        target = work_dir / f"case-{case.index}"
        try:
            series = unpack_series(case.source, target)
            yield load_volume(series), series
        finally:
            shutil.rmtree(target, ignore_errors=True)
    elif case.source.name.lower().endswith(NIFTI_SUFFIXES):
        yield load_volume(case.source), None
    else:
        raise SatInputError(
            f"case {case.index} is neither NIfTI (.nii, .nii.gz), a DICOM series folder nor a .zip of one"
        )


def unpack_series(archive: Path, target: Path) -> Path:
    """Unpack a zip holding one DICOM series (at any depth) and return the folder of its slices."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            size = sum(member.file_size for member in bundle.infolist())
            if size > MAX_UNZIPPED_BYTES:
                raise SatInputError(f"the zip would unpack to {size / 2**30:.1f} GiB; at most 8 GiB are accepted")
            bundle.extractall(target)  # zipfile keeps members inside target (no "..", no absolute paths)
    except zipfile.BadZipFile:
        raise SatInputError("the zip file is truncated or not a zip") from None
    folders = sorted({path.parent for path in target.rglob("*") if path.is_file()})
    if len(folders) != 1:
        raise SatInputError(f"the zip holds files in {len(folders)} folders; one DICOM series is expected")
    return folders[0]
