"""Entry points of the commands that need the engine (the core's here; each stage wires its own with
:func:`engine_command`): on a client-only install (``pip install ".[client]"``)
they say so in one line instead of a traceback, since the same distribution installs every command."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

NO_ENGINE = (
    "{prog}: error: this command needs the engine (PyTorch, MONAI, transformers), which this install lacks; "
    "install it with pip install '.[engine]' (or .[cpu] / .[gpu]); sat-client needs only .[client]"
)


def engine_command(prog: str, module: str) -> Callable[[], int]:
    """``module.main`` as a console script, or a one-line refusal (exit 2) where torch is not installed."""

    def main() -> int:
        if importlib.util.find_spec("torch") is None:
            print(NO_ENGINE.format(prog=prog), file=sys.stderr)
            return 2
        return int(importlib.import_module(module).main() or 0)

    return main


segment = engine_command("sat-segment", "satseg.cli.segment")
checkpoint = engine_command("sat-checkpoint", "satseg.cli.checkpoint")
