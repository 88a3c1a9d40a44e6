"""Peak memory of the whole ``sat-segment`` path on CPU.

The case from the core issue: a 512x512x300 CT at 0.8x0.8x1.0 mm with 32 prompts and the
``tiny`` model. ``sat-segment`` runs as a child process, so its peak resident set size is
measured alone (``getrusage(RUSAGE_CHILDREN)``), and is printed next to what the reference
design's fp32 blending accumulators alone would need for the same case.

    python benchmarks/memory_segment.py [--shape 512 512 300] [--prompts 32]
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from satseg.cli.checkpoint import main as checkpoint_cli
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.text import Vocabulary

BUDGET_GB = 4.0


def model_grid_voxels(shape: tuple[int, ...], spacing: tuple[float, ...], target=(1.0, 1.0, 3.0)) -> int:
    """Voxels of the resampled grid (before cropping), as the reference allocates them."""
    return int(np.prod([round(n * s / t) for n, s, t in zip(shape, spacing, target, strict=True)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.0))
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    with tempfile.TemporaryDirectory(prefix="sat-memory-") as folder:
        work = Path(folder)
        volume, _, _ = make_torso_phantom(shape, centred_affine(shape, spacing))
        nib.save(nib.Nifti1Image(volume.array, volume.affine), work / "ct.nii.gz")
        del volume
        checkpoint_cli(["init", "--size", "tiny", "--output", str(work / "checkpoint")])
        prompts = Vocabulary.load().for_modality("ct")[: args.prompts]
        command = [
            *(sys.executable, "-m", "satseg.cli.segment"),
            *("-i", str(work / "ct.nii.gz"), "-o", str(work / "out")),
            *("--checkpoint", str(work / "checkpoint"), "--device", "cpu", "--modality", "ct"),
            *("--prompts", ",".join(prompts), "--ml", "--statistics", "--preview", "--quiet"),
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    reference_gb = 2 * len(prompts) * model_grid_voxels(shape, spacing) * 4 / 1e9
    threads = torch.get_num_threads()
    print(f"machine: {platform.machine()}, {threads} torch threads, torch {torch.__version__}")
    print(f"case: {'x'.join(map(str, shape))} at {'x'.join(map(str, spacing))} mm, {len(prompts)} prompts, tiny model")
    print(f"sat-segment wall time: {seconds:.0f} s")
    print(f"sat-segment peak RSS: {peak_gb:.2f} GB (budget {BUDGET_GB:.1f} GB: {peak_gb / BUDGET_GB:.0%} of it)")
    print(f"reference fp32 accumulators alone (prediction + count per prompt): {reference_gb:.2f} GB")
    return 0 if peak_gb < BUDGET_GB else 1


if __name__ == "__main__":
    raise SystemExit(main())
