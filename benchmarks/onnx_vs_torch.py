"""Time per window of the vision model: onnxruntime (CPU) against PyTorch (CPU), side by side in one run.

For each size (random weights, seed 0) the vision graph is exported with ``export.onnx``, then both runtimes
segment the same window (``[1, 1, *patch]``) with the same ``--prompts`` queries, alternating, after one
warm-up run each; both use the same number of threads. The ratio is PyTorch time / onnxruntime time.

    python benchmarks/onnx_vs_torch.py [--sizes tiny nano] [--repeats 3] [--prompts 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from machine import cpu_model

from export.onnx import export_vision
from satseg.model import build_sat


def time_call(function: object, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``function()`` in seconds (after one untimed call)."""
    function()  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: str, repeats: int, prompts: int, threads: int) -> str:
    torch.manual_seed(0)
    sat = build_sat(size).eval()
    image = torch.randn(1, 1, *sat.config.patch_size)
    queries = torch.randn(1, prompts, sat.config.d_model)
    with tempfile.TemporaryDirectory() as folder:
        graph = export_vision(sat, Path(folder) / "vision.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])
        feeds = {"image": image.numpy(), "queries": queries.numpy()}

        def run_torch() -> None:
            with torch.inference_mode():
                sat.vision(image, queries)

        torch_s = time_call(run_torch, repeats)
        onnx_s = time_call(lambda: session.run(None, feeds), repeats)
    patch = "x".join(map(str, sat.config.patch_size))
    return f"| {size} | {patch} | {prompts} | {torch_s:.3f} s | {onnx_s:.3f} s | {torch_s / onnx_s:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "nano"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(
        f"CPU: {cpu_model()}, {threads} threads for both runtimes; "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"
    )
    print("| size | window | prompts | PyTorch CPU | onnxruntime CPU | PyTorch / onnxruntime |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        print(measure(size, args.repeats, args.prompts, threads), flush=True)


if __name__ == "__main__":
    main()
