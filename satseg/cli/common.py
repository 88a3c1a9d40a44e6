"""What every CLI shares: one-line errors for bad input, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from satseg.errors import CheckpointError, ExportError, SatInputError, one_line

USER_ERRORS = (SatInputError, CheckpointError, ExportError, FileNotFoundError, NotADirectoryError, PermissionError)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a user error prints ``prog: error: message`` on one line and returns 2."""
    try:
        return body()
    except USER_ERRORS as error:
        print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def cli_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """An argument parser whose epilog (examples, outputs) keeps its line breaks in ``--help``."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
