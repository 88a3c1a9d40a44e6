"""What every CLI shares: one-line errors for bad input, never a traceback."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from types import FrameType

from satseg.errors import CheckpointError, ExportError, SatInputError, one_line

USER_ERRORS = (SatInputError, CheckpointError, ExportError, FileNotFoundError, NotADirectoryError, PermissionError)


class StopRequested(Exception):
    """SIGTERM, SIGHUP or SIGINT arrived: leave the wait and stop what was started."""


def raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopRequested(signal.Signals(signum).name)


def stop_on_signals(*signals: signal.Signals) -> None:
    """Make each of ``signals`` raise :class:`StopRequested` in the main thread, so that ``finally`` blocks stop
    what a long-running command started (a shell starts a background job with SIGINT ignored: set it here)."""
    for handled in signals:
        signal.signal(handled, raise_stop)


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
    except MemoryError:  # under a memory limit (prlimit, a cgroup) allocation fails here rather than OOM-killing
        print(
            f"{prog}: error: out of memory; the volume and prompts need more memory than this process may use "
            "(fewer prompts per run, a smaller volume, or more memory)",
            file=sys.stderr,
        )
        return 1


def cli_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """An argument parser whose epilog (examples, outputs) keeps its line breaks in ``--help``."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
