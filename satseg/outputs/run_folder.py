"""An output folder that holds one complete run or the previous one, never a mix of both.

A run is written into a hidden work folder beside the target and swapped in whole at the end: on Linux
with ``renameat2(RENAME_EXCHANGE)``, one atomic step; elsewhere with two renames. An interrupted run removes
its work folder, so the target keeps the earlier complete result. A folder is a run's when its manifest
(:data:`MANIFEST_FILE`, written last) lists exactly the files in it; a folder holding anything else is
refused as a target rather than replaced, so no file a user put there is lost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from satseg.errors import SatInputError
from satseg.outputs.statistics import write_json

MANIFEST_FILE = "sat_run.json"
NOTICE = "AI-generated segmentation; research use only, not for clinical use"
_WORK_MARK = ".sat-work-"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def check_output_folder(target: Path) -> None:
    """Refuse ``target`` before any work starts unless it is absent, an empty folder or an earlier run's folder.

    Raises:
        SatInputError: ``target`` is a file, or a folder holding files no run wrote (named, up to three).
    """
    refuse_existing_file(target)
    if not target.is_dir():
        return
    present = {entry.name for entry in target.iterdir()}
    foreign = sorted(present - set(run_files(target)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
        raise SatInputError(
            f"-o {target} holds files an earlier run did not write ({shown}); "
            "name a new or empty folder, or one an earlier run wrote"
        )


def refuse_existing_file(target: Path) -> None:
    """Refuse an output folder's name that an existing file holds (before any work, not after it)."""
    if target.exists() and not target.is_dir():
        raise SatInputError(f"-o {target} is an existing file; name a folder (it is created)")


def run_files(folder: Path) -> list[str]:
    """The names a run's manifest lists (the manifest included); ``[]`` when ``folder`` has no valid one."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = [str(name) for name in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [*files, MANIFEST_FILE]


@contextmanager
def run_folder(target: Path, record: dict[str, Any]) -> Iterator[Path]:
    """Yield an empty work folder; when the block ends normally, write the manifest (``record`` plus the list of
    files) into it and swap it in as ``target``. On any exception or interrupt, the work folder is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    check_output_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work(target)
    work = target.parent / f".{target.name}{_WORK_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        yield work
        files = sorted(entry.name for entry in work.iterdir())
        write_json({**record, "notice": NOTICE, "files": files}, work / MANIFEST_FILE)
        swap_into_place(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the new run on failure; the replaced old one on success


def swap_into_place(work: Path, target: Path) -> None:
    """Make ``work`` the folder at ``target``; the earlier ``target``, if any, is left at ``work`` to delete."""
    if not target.exists():
        os.rename(work, target)
    elif not _exchange(work, target):
        parked = work.with_name(work.name + "-old")
        os.rename(target, parked)
        os.rename(work, target)
        os.rename(parked, work)


def remove_stale_work(target: Path) -> None:
    """Remove work folders of runs into ``target`` whose process is gone (killed runs leave them behind)."""
    for leftover in target.parent.glob(f".{target.name}{_WORK_MARK}*"):
        pid = leftover.name[len(target.name) + len(_WORK_MARK) + 1 :].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); ``False`` where unsupported.

    By hand through ctypes: neither ``os`` nor a maintained library exposes renameat2.
    """
    library = ctypes.util.find_library("c")
    libc = ctypes.CDLL(library, use_errno=True) if library else None
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0
