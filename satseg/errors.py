"""Errors that reach users as one line, never as a traceback, and the helpers that keep them one line."""

from __future__ import annotations

import re

QUOTE_LIMIT = 40
"""Characters of user text (a prompt, a value) an error message quotes at most."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SatInputError(ValueError):
    """Bad user input: a volume, a prompt, a file or an option.

    The message is one line that says what was wrong and what is accepted.
    CLIs print it as ``<prog>: error: <message>`` and exit with status 2;
    the server answers the request alone with INVALID_ARG.
    """


class CheckpointError(RuntimeError):
    """A checkpoint that does not match its config or the code (never loaded partially)."""


class ExportError(RuntimeError):
    """An export step that cannot be done here or failed its gate: no TensorRT, a plan built for another
    GPU or TensorRT version, a parity gate missed. The message names the way forward."""


def one_line(text: str) -> str:
    """``text`` on one line: control characters (ESC, newlines, tabs) become spaces, runs of space collapse."""
    return " ".join(_CONTROL.sub(" ", text).split())


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """A short, safe quotation of user text for an error message: one line, at most ``limit`` characters."""
    line = one_line(text)
    return f'"{line}"' if len(line) <= limit else f'"{line[:limit]}…" ({len(text)} characters)'
