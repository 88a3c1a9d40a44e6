"""One prompt back to the input grid: MONAI's invertible transforms against ours, side by side.

Both start from the same 512x512x300 CT at 0.8x0.8x1.0 mm (axis-aligned, like most CTs) and
time the inverse of reorientation + resampling to 1x1x3 mm for one probability map. Each runs
in its own child process, so its transient memory (peak RSS minus RSS before the call) is its own.

    python benchmarks/inverse_resampling.py [--shape 512 512 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from satseg.phantom import centred_affine, make_torso_phantom


def resident_gb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) * 1024 / 1e9


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def measure_monai(shape: tuple[int, int, int]) -> dict[str, float]:
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientation, Spacing

    volume, _, _ = make_torso_phantom(shape, centred_affine(shape, (0.8, 0.8, 1.0)))
    image = MetaTensor(torch.from_numpy(volume.array[None].astype(np.float32)), affine=torch.as_tensor(volume.affine))
    del volume
    transform = Compose([Orientation(axcodes="RAS"), Spacing(pixdim=(1.0, 1.0, 3.0), mode="bilinear")])
    probabilities = transform(image).sigmoid()  # keeps the applied operations needed to invert
    del image
    before = resident_gb()
    started = time.perf_counter()
    restored = transform.inverse(probabilities)
    seconds = time.perf_counter() - started
    assert tuple(restored.shape[1:]) == shape
    return {"seconds": seconds, "transient_gb": peak_gb() - before}


def measure_ours(shape: tuple[int, int, int]) -> dict[str, float]:
    from satseg.engine.preprocess import prepare

    volume, _, _ = make_torso_phantom(shape, centred_affine(shape, (0.8, 0.8, 1.0)))
    prepared = prepare(volume, "ct")
    del volume
    probabilities = prepared.image.sigmoid()
    before = resident_gb()
    started = time.perf_counter()
    restored = prepared.to_input_grid(probabilities)
    seconds = time.perf_counter() - started
    assert tuple(restored.shape) == shape
    return {"seconds": seconds, "transient_gb": peak_gb() - before}


MEASURES = {"monai": measure_monai, "ours": measure_ours}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--only", choices=sorted(MEASURES), help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.only:
        print(json.dumps(MEASURES[args.only](shape)))
        return 0
    results = {}
    for name in MEASURES:
        command = [sys.executable, __file__, "--only", name, "--shape", *map(str, shape)]
        results[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print(f"case: one probability map back to a {'x'.join(map(str, shape))} grid, {torch.get_num_threads()} threads")
    for name, result in results.items():
        print(f"{name:>6}: {result['seconds']:6.2f} s, transient {result['transient_gb']:.2f} GB")
    monai, ours = results["monai"], results["ours"]
    print(
        f"ratio monai/ours: {monai['seconds'] / ours['seconds']:.1f}x time, "
        f"{monai['transient_gb'] / max(ours['transient_gb'], 1e-3):.1f}x memory"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
