"""Entry points of the commands that need the engine: on a client-only install (``pip install ".[client]"``)
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
phantom = engine_command("sat-phantom", "training.data.phantom")
mni152 = engine_command("sat-mni152", "training.data.mni152")
standardise = engine_command("sat-standardise", "training.data.standardise")
pretrain_text = engine_command("sat-pretrain-text", "training.pretrain_text")
train = engine_command("sat-train", "training.train")
evaluate = engine_command("sat-evaluate", "training.evaluate")
export = engine_command("sat-export", "export.build_repo")
import_sat = engine_command("sat-import", "export.import_sat")
demo = engine_command("sat-demo", "clients.demo")
loadtest = engine_command("sat-loadtest", "loadtest.run")
loadtest_sweep = engine_command("sat-loadtest-sweep", "loadtest.sweep")
