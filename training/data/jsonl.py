"""Numbered lines of a JSON-lines file, read with a one-line error."""

from __future__ import annotations

from pathlib import Path

from satseg.errors import SatInputError


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of ``path``, numbered from 1."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SatInputError(f"cannot read {path}: {' '.join(str(error).split())}") from error
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
