"""Time per window of the vision model: onnxruntime (CPU) against PyTorch (CPU), side by side in one run.

For each size (random weights, seed 0) the vision graph is exported with ``export.onnx``, then each runtime
segments the same window (``[1, 1, *patch]``) with the same ``--prompts`` queries in its own child process
(so a large model's two runtimes never hold memory at once), after one warm-up run; both use the same
number of threads. The ratio is PyTorch time / onnxruntime time.

    python benchmarks/onnx_vs_torch.py [--sizes tiny nano] [--repeats 3] [--prompts 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime
import torch
from machine import cpu_model

from export.isolated import run_isolated
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


def inputs(size: str, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same window and queries for both runtimes (seeded)."""
    config = build_sat(size).config
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, *config.patch_size, generator=generator)
    return image, torch.randn(1, prompts, config.d_model, generator=generator)


def time_torch(size: str, repeats: int, prompts: int, threads: int, results: Any) -> None:
    """Child process: PyTorch's time per window (its own process, so the two runtimes never share memory)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sat = build_sat(size).eval()
    image, queries = inputs(size, prompts)

    def run() -> None:
        with torch.inference_mode():
            sat.vision(image, queries)

    results.put(time_call(run, repeats))


def time_onnx(path: str, size: str, repeats: int, prompts: int, threads: int, results: Any) -> None:
    """Child process: onnxruntime's time per window on the exported graph."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    image, queries = inputs(size, prompts)
    feeds = {"image": image.numpy(), "queries": queries.numpy()}
    results.put(time_call(lambda: session.run(None, feeds), repeats))


def measure(size: str, repeats: int, prompts: int, threads: int) -> str:
    """Export the graph here, then time each runtime in its own child process."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        sat = build_sat(size).eval()
        graph = export_vision(sat, Path(folder) / "vision.onnx")
        patch = "x".join(map(str, sat.config.patch_size))
        del sat
        torch_s = run_isolated(time_torch, size, repeats, prompts, threads)
        onnx_s = run_isolated(time_onnx, str(graph.path), size, repeats, prompts, threads)
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
