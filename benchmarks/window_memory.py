"""Peak memory and time of one SAT vision window on the CPU, per memory format, side by side in one run.

Each variant runs in its own child process (so its peak resident set is its own): a random model of the
size asked for is built, one forward pass runs on a window of the model's patch size with ``--prompts``
queries under ``torch.inference_mode``, and the child reports the pass's wall time and its peak RSS above
the process before the pass (weights, libraries). ``channels-first`` is PyTorch's default layout;
``channels-last`` is what :class:`~satseg.pipeline.Segmenter` runs on the CPU.

    python benchmarks/window_memory.py [--size nano] [--prompts 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from machine import cpu_model

from satseg.model import SATVision, get_config

FORMATS = {"channels-first": torch.contiguous_format, "channels-last": torch.channels_last_3d}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def one_window(size: str, prompts: int, memory_format: str) -> dict[str, float]:
    """In this process: the pass's seconds and its peak RSS above the process before it, in GB."""
    torch.manual_seed(0)
    vision = SATVision(get_config(size)).eval().to(memory_format=FORMATS[memory_format])
    image = torch.randn(1, 1, *vision.config.patch_size)
    queries = torch.randn(1, prompts, vision.config.d_model)
    before = peak_rss_gb()
    with torch.inference_mode():
        start = time.perf_counter()
        vision(image, queries)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_above_gb": peak_rss_gb() - before, "peak_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="nano")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--child", choices=tuple(FORMATS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_window(args.size, args.prompts, args.child)))
        return
    patch = "x".join(map(str, get_config(args.size).patch_size))
    print(f"SAT-{args.size} vision, one {patch} window, {args.prompts} prompts; {cpu_model()}, {os.cpu_count()} CPUs")
    print("| memory format | forward s | peak RSS above the loaded model GB | process peak RSS GB |")
    print("|---|---:|---:|---:|")
    for memory_format in FORMATS:
        command = [sys.executable, __file__, "--size", args.size, "--prompts", str(args.prompts)]
        child = subprocess.run([*command, "--child", memory_format], capture_output=True, check=True)
        result = json.loads(child.stdout)
        print(
            f"| {memory_format} | {result['seconds']:.1f} | {result['peak_above_gb']:.2f} | {result['peak_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
