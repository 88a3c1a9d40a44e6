"""PyTorch FP16 (CUDA autocast) against FP32 on one window of the SAT vision model: mask agreement and time.

The window is a synthetic torso CT prepared exactly like inference input, the weights random (seed 0) and the
``--prompts`` queries seeded random, so no data or checkpoint is needed. Agreement is the parity gate's: per
prompt, Dice of ``logits > 0`` (``satseg_export.parity``), with the max and p99 absolute logit error. Times are the
median of ``--repeats`` synchronised calls after two warm-up calls, side by side in one run.

    python benchmarks/gpu_fp16.py [--size nano] [--prompts 8] [--repeats 10] [--device cuda]

``--device cpu`` runs the same code on the CPU (autocast to float16 there too), to check the script, not the
speed, on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from machine import cpu_model

from satseg.model import SATVision, get_config
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.pipeline import vision_logits
from satseg.spec import DEFAULT_PREPROCESS, ModelSpec, PostprocessSpec, WindowSpec
from satseg_export.parity import absolute_errors, mask_agreement, volume_patches

PHANTOM_SHAPE = (160, 128, 60)


def phantom_window(patch_size: tuple[int, int, int]) -> torch.Tensor:
    """The most textured window ``[1, 1, H, W, D]`` of a synthetic torso CT, prepared for the model."""
    volume, _, _ = make_torso_phantom(PHANTOM_SHAPE, centred_affine(PHANTOM_SHAPE, (2.0, 2.0, 5.0), 10.0), seed=0)
    return volume_patches(volume, "ct", ModelSpec(DEFAULT_PREPROCESS, WindowSpec(patch_size), PostprocessSpec(), ""), 1)


def timed(run: object, device: torch.device, repeats: int, warmups: int = 2) -> tuple[np.ndarray, float, float]:
    """``run()``'s logits as numpy, its median seconds over ``repeats`` (>= 1) calls after ``warmups``, and its
    peak memory in GB (CUDA only, else 0)."""

    def synchronised() -> torch.Tensor:
        result = run()  # type: ignore[operator]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmups):
        synchronised()
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        logits = synchronised()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    return logits.cpu().numpy(), statistics.median(times), peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="nano", help="model size (default nano)")
    parser.add_argument("--prompts", type=int, default=8, help="queries per window (default 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per precision (default 10)")
    parser.add_argument("--warmups", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, f"gpu_fp16.py: no CUDA device (torch {torch.__version__}); --device cpu checks the script\n")
    config = get_config(args.size)
    torch.manual_seed(0)
    vision = SATVision(config).to(device).eval()
    window = phantom_window(config.patch_size).to(device)
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(1, args.prompts, config.d_model, generator=generator).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()} (CPU)"
    print(f"{args.size} vision, window {'x'.join(map(str, config.patch_size))}, {args.prompts} prompts, on {where}")
    print(f"torch {torch.__version__}, median of {args.repeats} calls after {args.warmups} warm-up")
    results = {}
    with torch.inference_mode():
        for precision in ("fp32", "fp16"):
            results[precision] = timed(
                lambda p=precision: vision_logits(vision, window, queries, p), device, args.repeats, args.warmups
            )
    (fp32, fp32_s, fp32_gb), (fp16, fp16_s, fp16_gb) = results["fp32"], results["fp16"]
    worst, p99 = absolute_errors(fp32, fp16)
    dice = mask_agreement(fp32, fp16, [f"prompt {index}" for index in range(args.prompts)])
    print("| precision | time per window | peak memory |")
    print("|---|---|---|")
    print(f"| fp32 | {fp32_s * 1e3:.1f} ms | {fp32_gb:.2f} GB |")
    print(f"| fp16 | {fp16_s * 1e3:.1f} ms | {fp16_gb:.2f} GB |")
    print(f"fp32 / fp16 time: {fp32_s / fp16_s:.2f}x")
    print(f"fp16 against fp32: max |logit error| {worst:.3e}, p99 {p99:.3e}")
    print(f"Dice agreement of logits > 0: min {min(dice.values()):.4f}, mean {np.mean(list(dice.values())):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
