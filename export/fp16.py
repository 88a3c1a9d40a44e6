"""FP16 variants of exported ONNX graphs, for onnxruntime-gpu and for TensorRT 11 (strongly typed networks).

Weights and activations become float16; the graph's inputs and outputs stay float32 (clients and the
stitcher never see half precision), and normalisation layers stay float32: InstanceNorm's variance over a
whole 3D feature map and LayerNorm's over the hidden size are where FP16 loses accuracy (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

from satseg.onnx_graphs import ExportedGraph, file_sha256, graph_shapes

FP32_OPS = ("InstanceNormalization", "LayerNormalization")
"""Ops kept in float32 in the FP16 graphs."""


def convert_to_fp16(source: Path, target: Path) -> ExportedGraph:
    """Write the FP16 variant of the float32 graph ``source`` at ``target`` (float32 I/O and norms).

    Uses onnxruntime's converter (``onnxruntime.transformers.float16``), which inserts the casts around the
    ops it keeps in float32; the result is sorted topologically, checked with ``onnx.checker`` and gets a
    ``.sha256`` file.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(source))
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS], disable_shape_infer=True
    )
    sorted_model = OnnxModel(converted)
    sorted_model.topological_sort()  # the converter appends its casts last; ONNX wants producers first
    converted = sorted_model.model
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(target))
    onnx.checker.check_model(str(target))
    sha256 = file_sha256(target)
    target.with_name(target.name + ".sha256").write_text(f"{sha256}  {target.name}\n")
    return ExportedGraph(target, sha256, graph_shapes(converted.graph.input), graph_shapes(converted.graph.output))
