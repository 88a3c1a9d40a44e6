"""Training throughput in patches per second: ``tiny`` on the CPU and, where CUDA is, ``nano`` on the GPU.

Each measurement times the real optimizer step (``satseg_training.train.train_step``: forward with deep supervision,
Dice + BCE, backward, clipping, AdamW, through accelerate) in steady state: warm-up steps first, then
``--steps`` timed steps. Patches come from the real sampler (phantom CTs) and are made beforehand and
reused in turn, so data generation is not timed. The batch size is the training config's.

    python benchmarks/train_throughput.py [--config training/configs/demo.toml] [--steps 5] [--warmup 2]

The GPU measurement runs in a child process (accelerate keeps one precision per process): ``nano`` with
bf16 autocast where the card supports it, else fp16.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from machine import cpu_model

from satseg.model import build_sat, get_config
from satseg.text import Vocabulary
from satseg_training.config import DataSettings, load_config
from satseg_training.patches import PatchDataset, PhantomPool, collate_patches
from satseg_training.queries import PromptedSegmentation
from satseg_training.train import train_step

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "demo.toml"
DISTINCT_BATCHES = 2


def measure(size: str, device: str, batch_size: int, steps: int, warmup: int) -> str:
    """Time ``steps`` optimizer steps of ``size`` after ``warmup`` ones; one line of results."""
    precision = "no"
    if device == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    torch.backends.cudnn.benchmark = True  # as training/train.py does
    torch.manual_seed(0)
    sat = build_sat(size)
    vocabulary = Vocabulary.load()
    model = PromptedSegmentation(sat, [term.name for term in vocabulary.terms])
    patch = get_config(size).patch_size
    dataset = PatchDataset(
        [PhantomPool()], np.ones(1), model.terms, vocabulary, patch, DataSettings(phantom=True), batch_size * 2
    )
    batches = [
        collate_patches([dataset[b * batch_size + i] for i in range(batch_size)]) for b in range(DISTINCT_BATCHES)
    ]
    batches = [{key: value.to(accelerator.device) for key, value in batch.items()} for batch in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    cycle = itertools.cycle(batches)

    def run(count: int) -> None:
        for _ in range(count):
            train_step(accelerator, model, optimizer, [next(cycle)], gradient_clip=1.0)
        if device == "cuda":
            torch.cuda.synchronize()

    run(warmup)
    started = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - started
    prompts = np.mean([int(batch["valid"].sum()) / batch_size for batch in batches])
    where = f"cpu ({torch.get_num_threads()} threads)" if device == "cpu" else torch.cuda.get_device_name()
    return (
        f"{size} on {where}, precision {precision}: batch {batch_size} of {'x'.join(map(str, patch))}, "
        f"{prompts:.0f} prompts per patch: {batch_size * steps / seconds:.2f} patches/s "
        f"({seconds / steps:.2f} s/step over {steps} steps after {warmup} warm-up)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config giving the batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all", help="default: cpu, then cuda")
    args = parser.parse_args()
    batch_size = load_config(args.config).train.batch_size
    if args.device in ("all", "cpu"):
        print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
        print(measure("tiny", "cpu", batch_size, args.steps, args.warmup), flush=True)
    if args.device == "cuda":
        print(measure("nano", "cuda", batch_size, args.steps, args.warmup))
    elif args.device == "all" and torch.cuda.is_available():
        child = [sys.executable, __file__, "--device", "cuda", "--config", str(args.config)]
        subprocess.run([*child, "--steps", str(args.steps), "--warmup", str(args.warmup)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
