"""Where ``sat-segment``'s wall time goes, stage by stage: the network against everything else, in one process.

Runs ``sat-segment`` (its ``main``, with the arguments given after ``--``) with a stopwatch around each stage's
function, and prints each stage's seconds and share of the wall time from before the first import to exit.
Stopwatches, not cProfile: the profiler's per-call cost would inflate the Python-heavy stages it measures.

    python benchmarks/pipeline_profile.py -- -i CT.nii.gz --modality ct -o OUT --prompts liver,spleen \
        --runtime openvino [--checkpoint DIR]

Each stage counts its own seconds, not those of the timed stages it calls: ``network`` is the vision runtime's
calls (:meth:`Segmenter.predict_logits`) less OpenVINO's compilation, which happens in the first of them (the
window's shape is fixed then); ``sigmoid and blend`` is each batch of windows
(:func:`satseg.window.stitcher._add_batch`) less the network calls inside it.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import functools  # noqa: E402 (the clock starts before the imports it measures)
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import openvino  # noqa: E402
from machine import cpu_model  # noqa: E402

import satseg.cli.segment  # noqa: E402
import satseg.engine.run  # noqa: E402
import satseg.outputs.writer  # noqa: E402
import satseg.window.stitcher  # noqa: E402
from satseg.engine.preprocess import PreparedVolume  # noqa: E402
from satseg.pipeline import Segmenter  # noqa: E402

IMPORTED = time.perf_counter()
SECONDS: dict[str, float] = defaultdict(float)
RUNNING: list[str] = []
"""The timed stages in progress, innermost last."""
STAGES: dict[str, tuple[Any, str]] = {
    "read the input": (satseg.cli.segment, "load_volume"),
    "model grid (reorient, resample, crop, normalise)": (Segmenter, "prepare"),
    "encode the prompts": (Segmenter, "encode"),
    "network": (Segmenter, "predict_logits"),
    "compile the graph (OpenVINO)": (openvino.Core, "compile_model"),
    "sigmoid and blend": (satseg.window.stitcher, "_add_batch"),
    "back to the input grid": (PreparedVolume, "to_input_grid"),
    "largest piece": (satseg.engine.run, "keep_largest_component"),
    "write the masks (NIfTI, gzip)": (satseg.outputs.writer, "write_mask"),
}


def stopwatch(stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` adding its own seconds to ``stage``: those of timed stages it calls go to theirs."""

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        RUNNING.append(stage)
        try:
            return function(*args, **kwargs)
        finally:
            RUNNING.pop()
            elapsed = time.perf_counter() - start
            SECONDS[stage] += elapsed
            if RUNNING:
                SECONDS[RUNNING[-1]] -= elapsed

    return timed


def main() -> None:
    argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    for stage, (owner, name) in STAGES.items():
        setattr(owner, name, stopwatch(stage, getattr(owner, name)))
    code = satseg.cli.segment.main(argv)
    wall = time.perf_counter() - STARTED
    network = SECONDS["network"]
    rows = {"imports": IMPORTED - STARTED, **{stage: SECONDS[stage] for stage in STAGES}}
    rows["the rest (checkpoint, graph load, plan, statistics)"] = wall - sum(rows.values())
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; sat-segment {' '.join(argv)}")
    print("| stage | s | share of the wall time |")
    print("|---|---:|---:|")
    for stage, seconds in rows.items():
        print(f"| {stage} | {seconds:.1f} | {seconds / wall:.1%} |")
    print(f"| **wall time** | **{wall:.1f}** | outside the network: **{1 - network / wall:.1%}** |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
