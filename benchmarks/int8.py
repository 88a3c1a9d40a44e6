"""INT8 against FP32 for the trained demo model on a real CT: per-prompt Dice and time per window, side by side.

The bundled demo model's vision graph (exported with ``satseg.onnx_graphs``) is quantized by each of
``satseg_export.int8.CANDIDATES`` exactly as ``sat-export --int8`` does it: calibrated on every other window
of the CT (all windows, most textured first, through inference's preprocessing), then compared with OpenVINO
FP32 on the other windows, with the demo model's trained abdominal prompts. Times are the median of
``--repeats`` passes over ``--timed`` windows, with 2 threads, FP32 and INT8 alternating in one process.

    python benchmarks/int8.py [--ct ../shared/data/totalseg/example_ct.nii.gz] [--timed 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino
import torch
from machine import cpu_model

from satseg.checkout import BUNDLED_CHECKPOINT
from satseg.checkpoint import load_checkpoint
from satseg.geometry import MODALITIES, Volume, load_volume
from satseg.onnx_graphs import export_vision
from satseg.runtimes import OPENVINO_PRECISION_HINTS, int8_acceleration, openvino_has_native_bf16
from satseg.text import PromptTokenizer, Vocabulary, resolve_text_encoder
from satseg_export.int8 import CANDIDATES, quantize
from satseg_export.parity import INT8_MIN_DICE, mask_agreement, volume_patches

SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg" / "example_ct.nii.gz"
PROMPTS = ("liver", "spleen", "left kidney", "right kidney", "stomach", "aorta")
THREADS = 2


def logits(compiled: openvino.CompiledModel, windows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.concatenate([compiled({"image": window[None], "queries": queries[None]})[0] for window in windows])


def seconds_per_window(compiled: openvino.CompiledModel, windows: np.ndarray, queries: np.ndarray) -> float:
    started = time.perf_counter()
    logits(compiled, windows, queries)
    return (time.perf_counter() - started) / len(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, default=SHARED_CT)
    parser.add_argument("--timed", type=int, default=8, help="windows timed per pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    sat, metadata = load_checkpoint(BUNDLED_CHECKPOINT)
    vocabulary = Vocabulary.load()
    spec = metadata.model_spec(vocabulary)
    ct = load_volume(args.ct)
    windows = volume_patches(Volume(ct.array, ct.affine, "ct"), "ct", spec, None).numpy()
    calibration, held_out = windows[0::2], windows[1::2]
    terms = vocabulary.resolve_all(list(PROMPTS))
    tokens = PromptTokenizer(resolve_text_encoder(sat.config.text_encoder))(terms)
    with torch.inference_mode():
        modality = torch.full((len(terms),), MODALITIES.index("ct"))
        queries = sat.encode_prompts(tokens["input_ids"], tokens["attention_mask"], modality).float().numpy()
    core = openvino.Core()
    config = {"INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS["int8"]}
    flags = int8_acceleration() or "none"
    print(f"CPU: {cpu_model()}; INT8 instructions: {flags}; native BF16: {openvino_has_native_bf16()}")
    print(f"{args.ct.name}: {len(calibration)} calibration windows, {len(held_out)} compared, prompts {PROMPTS}")
    with tempfile.TemporaryDirectory() as folder:
        onnx = export_vision(sat, Path(folder) / "vision.onnx").path
        fp32 = core.compile_model(str(onnx), "CPU", config)
        reference = logits(fp32, held_out, queries)
        print("| graph | worst prompt Dice vs FP32 | per prompt | FP32 s/window | INT8 s/window | FP32 / INT8 |")
        print("|---|---|---|---|---|---|")
        for candidate in CANDIDATES:
            graph = quantize(onnx, calibration, queries, candidate, Path(folder) / "int8.xml")
            int8 = core.compile_model(str(graph), "CPU", config)
            dice = mask_agreement(reference, logits(int8, held_out, queries), list(PROMPTS))
            timed = held_out[: args.timed]
            pairs = [
                (seconds_per_window(fp32, timed, queries), seconds_per_window(int8, timed, queries))
                for _ in range(args.repeats)
            ]
            fp32_s, int8_s = (statistics.median(times) for times in zip(*pairs, strict=True))
            verdict = "holds" if min(dice.values()) >= INT8_MIN_DICE else "below"
            per_prompt = ", ".join(f"{prompt} {value:.3f}" for prompt, value in dice.items())
            print(
                f"| INT8, {candidate.name} | {min(dice.values()):.4f} ({verdict} the {INT8_MIN_DICE} gate) "
                f"| {per_prompt} | {fp32_s:.3f} | {int8_s:.3f} | {fp32_s / int8_s:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
