"""How ``sat-segment``'s time and peak memory grow with the number of prompts, on a real CT, side by side.

Each count runs as its own process, one after the other, with the same checkpoint, CT and runtime: the first
N CT terms of the vocabulary in alphabetical order (the load test's ``many_prompts``), timed from start to exit
with the peak resident memory of the process (``wait4``). The vision backbone runs once per window whatever
the count, so time should grow far slower than the prompts.

    python benchmarks/prompt_scaling.py [--checkpoint models/demo] [--counts 8,32,128,162] [--runtime openvino]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model

from satseg.checkout import BUNDLED_CHECKPOINT
from satseg_loadtest.scenarios import many_prompts

HERE = Path(__file__).resolve().parent
SHARED_CT = HERE.parent.parent / "shared" / "data" / "totalseg" / "example_ct.nii.gz"
BIN = Path(sys.executable).parent


def timed(command: list[str]) -> tuple[float, float]:
    """Run ``command``; its wall time in s and its peak RSS in GB."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sat-segment failed: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
    return wall, usage.ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--image", type=Path, default=SHARED_CT)
    parser.add_argument("--counts", default="8,32,128,162", help="prompt counts (162: every CT term)")
    parser.add_argument("--runtime", default="openvino", help="sat-segment --runtime (default openvino)")
    parser.add_argument("--precision", default="fp32", help="sat-segment --precision (default fp32)")
    parser.add_argument("--ml", action="store_true", help="one label map instead of a mask file per prompt")
    parser.add_argument("--work", type=Path, default=HERE / "output" / "prompt_scaling")
    args = parser.parse_args()
    if not args.image.is_file():
        raise SystemExit(f"no CT at {args.image} (../shared/data; see its README)")
    counts = [int(count) for count in args.counts.split(",")]
    base = [str(BIN / "sat-segment"), "-i", str(args.image), "--modality", "ct", "--checkpoint", str(args.checkpoint)]
    base += ["--runtime", args.runtime, "--precision", args.precision, "--quiet", *(["--ml"] if args.ml else [])]
    timed([*base, "-o", str(args.work / "warm-up"), "--prompts", "liver"])  # the graph is exported once, untimed
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; checkpoint {args.checkpoint.name}; {args.image.name}; ")
    print(f"sat-segment --runtime {args.runtime} --precision {args.precision}{' --ml' if args.ml else ''}")
    print("| prompts | wall s | peak RSS GB | time ÷ first count's | RSS ÷ first count's |")
    print("|---:|---:|---:|---:|---:|")
    first: tuple[float, float] | None = None
    for count in counts:
        out = args.work / f"prompts-{count}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = timed([*base, "-o", str(out), "--prompts", ",".join(many_prompts(count))])
        first = first or (wall, rss)
        print(f"| {count} | {wall:.1f} | {rss:.2f} | {wall / first[0]:.2f} | {rss / first[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
