"""Time per window of the vision model: PyTorch, onnxruntime and OpenVINO on the CPU, side by side in one run.

For each size (random weights, seed 0) the vision graph is exported with ``satseg.onnx_graphs``; then each runtime
(PyTorch on the model; onnxruntime FP32, OpenVINO FP32 and, on a CPU with native BF16, OpenVINO BF16 on the
graph, all through :mod:`satseg.runtimes` as inference uses them) segments the same window (``[1, 1, *patch]``)
with the same ``--prompts`` queries in its own child process (so a large model's runtimes never hold memory at
once), after one warm-up run, with the same number of threads. Each is also compared with PyTorch: the Dice of
``logits > 0`` over the window (the worst prompt). Ratios are onnxruntime time / runtime time.

    python benchmarks/vision_runtimes.py [--sizes tiny nano] [--repeats 3] [--prompts 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import openvino
import torch
from machine import cpu_model

from satseg.model import build_sat
from satseg.onnx_graphs import export_vision
from satseg.runtimes import GraphSession, openvino_has_native_bf16
from satseg_export.isolated import run_isolated
from satseg_export.parity import mask_agreement

RUNS = ("PyTorch fp32", "onnxruntime fp32", "openvino fp32", "openvino bf16")
"""Each runtime and precision timed; the last only on a CPU with native BF16."""


def time_call(function: Any, repeats: int, signs: str) -> float:
    """Median wall time of ``repeats`` calls of ``function()`` in seconds, after one untimed call whose
    ``logits > 0`` go to the file ``signs`` (a child hands back only small values)."""
    np.save(signs, function() > 0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(size: str, prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """The same window and queries for every runtime (seeded)."""
    config = build_sat(size).config
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, *config.patch_size, generator=generator)
    return image.numpy(), torch.randn(1, prompts, config.d_model, generator=generator).numpy()


def time_torch(size: str, repeats: int, prompts: int, threads: int, signs: str, results: Any) -> None:
    """Child process: PyTorch's time per window and its logits."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sat = build_sat(size).eval()
    image, queries = (torch.from_numpy(array) for array in inputs(size, prompts))

    def run() -> np.ndarray:
        with torch.inference_mode():
            return sat.vision(image, queries).numpy()

    results.put(time_call(run, repeats, signs))


def time_graph(path: str, runtime: str, precision: str, size: str, repeats: int, prompts: int, threads: int,
               signs: str, results: Any) -> None:  # fmt: skip
    """Child process: one graph runtime's time per window and its logits."""
    session = GraphSession(Path(path), runtime, precision, threads=threads)
    image, queries = inputs(size, prompts)
    results.put(time_call(lambda: session.run({"image": image, "queries": queries}, ["logits"])[0], repeats, signs))


def measure(size: str, repeats: int, prompts: int, threads: int, bf16: bool) -> list[str]:
    """Export the graph here, then time each runtime in its own child process; one table row each."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        sat = build_sat(size).eval()
        graph = export_vision(sat, Path(folder) / "vision.onnx")
        patch = "x".join(map(str, sat.config.patch_size))
        del sat
        signs = {name: str(Path(folder) / f"{name.replace(' ', '_')}.npy") for name in RUNS}
        timings = {"PyTorch fp32": run_isolated(time_torch, size, repeats, prompts, threads, signs["PyTorch fp32"])}
        for name in RUNS[1:] if bf16 else RUNS[1:-1]:
            runtime, precision = name.split()
            args = (str(graph.path), runtime, precision, size, repeats, prompts, threads, signs[name])
            timings[name] = run_isolated(time_graph, *args)
        positive = {name: np.load(signs[name]) for name in timings}
    baseline = timings["onnxruntime fp32"]
    names = [f"prompt {index}" for index in range(prompts)]
    rows = []
    for name, seconds in timings.items():
        worst = min(mask_agreement(positive["PyTorch fp32"], positive[name], names).values())
        speed = baseline / seconds
        rows.append(f"| {size} | {patch} | {prompts} | {name} | {seconds:.3f} s | {speed:.2f}x | {worst:.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "nano"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    bf16 = openvino_has_native_bf16()
    print(
        f"CPU: {cpu_model()}, {threads} threads for every runtime, native BF16: {'yes' if bf16 else 'no'}; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}"
    )
    print("| size | window | prompts | runtime | time per window | onnxruntime / it | worst prompt Dice vs PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        print("\n".join(measure(size, args.repeats, args.prompts, threads, bf16)), flush=True)


if __name__ == "__main__":
    main()
