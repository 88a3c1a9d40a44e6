"""Files that appear whole or not at all."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` all at once: yield a hidden temporary file next to it, then rename it.

    The temporary file sits in the same folder (``os.replace`` is atomic only within one
    file system) under a name that does not end like the target, so an interrupted run
    leaves no file that looks complete; it is removed on error. It is opened with the
    process umask (unlike ``tempfile.mkstemp``'s 0600), so the result has ordinary permissions.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(temporary, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            temporary.unlink()
        raise


def remove_stale_parts(path: Path) -> None:
    """Remove the temporary files a killed :func:`atomic_file` left for ``path`` (SIGKILL runs no clean-up)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.part"):
        with suppress(FileNotFoundError):
            stale.unlink()


def write_bytes_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`; returns ``path``."""
    with atomic_file(path) as file:
        file.write(data)
    return Path(path)
