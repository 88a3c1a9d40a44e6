"""The INT8 vision graph: NNCF post-training quantisation of the exported FP32 graph, for CPUs without BF16.

Calibrated on real windows of the parity volume, drawn through inference's own preprocessing
(:func:`~satseg_export.parity.volume_patches`); gated, like every precision, by per-prompt Dice against
PyTorch FP32 on other windows of that volume. The candidates are tried from the most quantized to the least
(:data:`CANDIDATES`); the first that holds the gate is installed as ``vision/1/model.int8.xml``, and every
one tried is in the export report. If none holds, no INT8 graph is installed and the report says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from satseg.runtimes import INT8_GRAPH
from satseg_export.parity import INT8_MIN_DICE, ParityReport, compare_vision, graph_vision_logits


@dataclass(frozen=True)
class Candidate:
    """One quantisation of the vision graph: NNCF's preset, and which of its convolutions stay in float
    (``float_first`` from the input, the image's own; ``float_from``: the convolutions from that fraction of
    the graph's order onward, the decoder's near the output, where a rounding error moves a mask's edge)."""

    name: str
    preset: str = "mixed"
    float_first: int = 0
    float_from: float = 1.0


CANDIDATES = (
    Candidate("every convolution"),
    Candidate("the first convolution in float", float_first=1),
    Candidate("the first convolution and the decoder's in float", float_first=1, float_from=0.5),
)
"""Tried in this order (benchmarks/RESULTS.md, "INT8"). On the bundled demo model and the real abdominal CT,
none holds the gate: the aorta's mask falls to Dice 0.63-0.68 and the stomach's to about 0.82."""


def quantize(onnx_path: Path, calibration: np.ndarray, queries: np.ndarray, candidate: Candidate, out: Path) -> Path:
    """``onnx_path`` quantized to INT8 as ``candidate`` says, calibrated on ``calibration`` ``[B, 1, H, W, D]``
    windows with ``queries`` ``[N, d]``; written to ``out`` (``.xml`` and its ``.bin``)."""
    import nncf
    import openvino

    model = openvino.Core().read_model(str(onnx_path))
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    kept = convolutions[: candidate.float_first] + convolutions[round(candidate.float_from * len(convolutions)) :]
    items = [{"image": window[None], "queries": queries[None]} for window in calibration]
    quantized = nncf.quantize(
        model,
        nncf.Dataset(items),
        preset=nncf.QuantizationPreset(candidate.preset),
        subset_size=len(items),
        ignored_scope=nncf.IgnoredScope(names=kept) if kept else None,
    )
    openvino.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def offer_int8(
    onnx_path: Path,
    calibration: np.ndarray,
    gate_windows: np.ndarray,
    expected: np.ndarray,
    queries: np.ndarray,
    prompts: list[str],
    inputs: str,
    log: Callable[[str], None] = print,
) -> tuple[Path | None, list[ParityReport]]:
    """The first of :data:`CANDIDATES` whose INT8 graph holds :data:`INT8_MIN_DICE` on ``gate_windows``
    (``expected``: PyTorch's logits for them), written beside ``onnx_path``; and the report of each tried.

    Returns:
        The installed graph (``None`` when none held the gate) and the reports, none blocking.
    """
    out = onnx_path.with_name(INT8_GRAPH)
    reports = []
    for candidate in CANDIDATES:
        quantize(onnx_path, calibration, queries, candidate, out)
        logits = graph_vision_logits(out, gate_windows, queries, "openvino", "int8")
        if logits is None:
            raise RuntimeError(f"OpenVINO could not run the INT8 graph {out}")
        report = compare_vision(
            expected,
            logits,
            prompts,
            graph=f"vision · openvino int8 ({candidate.name})",
            inputs=inputs,
            min_dice=INT8_MIN_DICE,
            blocking=False,
        )
        reports.append(report)
        log(f"    {report.summary()}")
        if report.passed:
            return out, reports
    out.unlink(missing_ok=True)
    out.with_suffix(".bin").unlink(missing_ok=True)
    return None, reports
