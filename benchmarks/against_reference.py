"""SAT end to end on a real CT: the reference algorithm against ``sat-segment``, side by side in one run.

For one model size (random weights, seed 0, written once by ``sat-checkpoint init``), each of these runs as its
own process on the same CT with the same prompts, one after the other, timed from start to exit with its peak
resident memory (``wait4``):

- the reference algorithm (:mod:`reference_sat`: PyTorch fp32);
- ``sat-segment`` with ``--runtime torch`` and with each graph runtime and precision named by ``--runs``.

The vision graph is exported into a cache before anything is timed. Then the masks are compared: every
``sat-segment`` run against the reference (its masks taken to the input grid by nearest neighbour), and every
graph runtime against ``sat-segment``'s PyTorch run (Dice per prompt; the worst and the mean are printed).

    python benchmarks/against_reference.py --size nano [--runs torch,openvino:fp32,openvino:bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import cpu_model
from nibabel.processing import resample_from_to
from reference_sat import reference_window_count

from satseg.checkpoint import read_metadata
from satseg.engine.preprocess import prepare
from satseg.geometry import load_volume
from satseg.outputs.writer import mask_file_name
from satseg.runtimes import openvino_has_native_bf16
from satseg.window import planned_windows

HERE = Path(__file__).resolve().parent
SHARED_CT = HERE.parent.parent / "shared" / "data" / "totalseg" / "example_ct.nii.gz"
PROMPTS = "liver,spleen,left kidney,right kidney,stomach,aorta,pancreas,gallbladder"
BIN = Path(sys.executable).parent


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``command``; its wall time in s and its peak RSS in GB (the process and its children waited for)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[0]} failed: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
    return wall, usage.ru_maxrss / 1024**2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def our_windows(checkpoint: Path, image: Path) -> tuple[int, list[int]]:
    """Windows ``sat-segment`` runs on ``image`` by the checkpoint's spec, and its model grid."""
    spec = read_metadata(checkpoint).spec
    assert spec is not None
    prepared = prepare(load_volume(image), "ct", spec.preprocess, spec.window)
    window = spec.window
    _, windows = planned_windows(prepared.image.shape, window.patch_size, window.overlap, window.edge_allowance)
    return len(windows), list(prepared.image.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="nano", choices=("tiny", "nano"))
    parser.add_argument("--image", type=Path, default=SHARED_CT)
    parser.add_argument("--prompts", default=PROMPTS)
    parser.add_argument("--runs", default="torch,openvino:fp32,openvino:bf16", help="runtime[:precision], ...")
    parser.add_argument("--work", type=Path, default=HERE / "output" / "against_reference")
    args = parser.parse_args()
    if not args.image.is_file():
        raise SystemExit(f"{args.image} is absent; this benchmark needs the shared TotalSegmentator CT")
    work = args.work / args.size
    checkpoint = work / "checkpoint"
    env = {**os.environ, "SATSEG_CACHE": str(work / "cache")}
    subprocess.run([BIN / "sat-checkpoint", "init", "--size", args.size, "-o", checkpoint, "--if-missing"], check=True)
    runs = [tuple([*item.split(":"), "fp32"][:2]) for item in args.runs.split(",")]
    if ("openvino", "bf16") in runs and not openvino_has_native_bf16():
        print("openvino bf16 left out: this CPU has no native BF16 (AVX512-BF16 or AMX)")
        runs.remove(("openvino", "bf16"))
    if any(runtime != "torch" for runtime, _ in runs):  # export once, untimed
        code = (
            "import sys; from satseg.checkpoint import DeferredCheckpoint; "
            "from satseg.graph_cache import cached_vision_graph; "
            "print(cached_vision_graph(DeferredCheckpoint(sys.argv[1])))"
        )
        subprocess.run([sys.executable, "-c", code, str(checkpoint)], env=env, check=True, stdout=subprocess.DEVNULL)

    terms = [term.strip() for term in args.prompts.split(",")]
    reference_out = work / "reference"
    command = [sys.executable, str(HERE / "reference_sat.py"), "--checkpoint", str(checkpoint)]
    command += ["--image", str(args.image), "--prompts", args.prompts, "--output", str(reference_out)]
    results = {"reference (PyTorch fp32)": timed(command, env)}
    reference = json.loads((reference_out / "reference.json").read_text())
    ours: dict[str, Path] = {}
    for runtime, precision in runs:
        name = f"sat-segment {runtime} {precision}"
        out = work / f"{runtime}-{precision}"
        command = [str(BIN / "sat-segment"), "-i", str(args.image), "-o", str(out), "--checkpoint", str(checkpoint)]
        command += ["--modality", "ct", "--prompts", args.prompts, "--runtime", runtime, "--precision", precision]
        results[name] = timed([*command, "--quiet"], env)
        ours[name] = out

    source = nib.load(args.image)
    reference_masks = [
        np.asarray(resample_from_to(nib.load(reference_out / f"{i:02d}.nii.gz"), source, order=0).dataobj) > 0
        for i in range(len(terms))
    ]
    masks = {
        name: [np.asarray(nib.load(out / mask_file_name(term)).dataobj) > 0 for term in terms]
        for name, out in ours.items()
    }
    windows, grid = our_windows(checkpoint, args.image)
    patch = tuple(read_metadata(checkpoint).config.patch_size)
    reference_time = results["reference (PyTorch fp32)"][0]
    reference_rss = results["reference (PyTorch fp32)"][1]
    torch_name = next((name for name in masks if " torch " in name), None)
    print(
        f"SAT-{args.size}, random weights, {len(terms)} prompts, {args.image.name} {source.shape}; {cpu_model()}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"windows: reference {reference['windows']} on {reference['grid']}; ours {windows} on {grid} "
        f"(the reference rule on our grid: {reference_window_count(tuple(grid), patch)})"
    )
    columns = ["run", "wall s", "peak RSS GB", "reference time / this", "this RSS / reference"]
    columns += ["Dice vs reference (min / mean)", "Dice vs our PyTorch (min)"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (wall, rss) in results.items():
        against_reference = against_torch = ""
        if name in masks:
            scores = [dice(a, b) for a, b in zip(masks[name], reference_masks, strict=True)]
            against_reference = f"{min(scores):.3f} / {np.mean(scores):.3f}"
            if torch_name and name != torch_name:
                against_torch = f"{min(dice(a, b) for a, b in zip(masks[name], masks[torch_name], strict=True)):.4f}"
        print(
            f"| {name} | {wall:.1f} | {rss:.2f} | {reference_time / wall:.2f} | {rss / reference_rss:.2f} | "
            f"{against_reference} | {against_torch} |"
        )


if __name__ == "__main__":
    main()
