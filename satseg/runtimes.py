"""CPU runtimes for an exported ONNX graph: onnxruntime and OpenVINO, behind one ``run(feeds)`` call.

The in-process ``Segmenter`` (``--runtime``), the Triton python models (``configs/cpu.pbtxt``) and the export
parity gates all open graphs here, so a graph runs the same way wherever it is checked or served.

OpenVINO is only used through ``Core.read_model``/``compile_model`` (the runtime, which sends no telemetry);
its model-conversion tools, which can, are never called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from satseg.errors import SatInputError

RUNTIMES = ("torch", "onnxruntime", "openvino")
"""``torch``: the checkpoint's own PyTorch model; the others run its exported ONNX graph."""
GRAPH_RUNTIMES = RUNTIMES[1:]
GRAPH_PRECISIONS = ("fp32", "bf16", "int8")
"""Arithmetic of a graph runtime: FP32; BF16 (OpenVINO only, on a CPU with native BF16); INT8 (OpenVINO only,
on the gated INT8 graph ``sat-export`` writes beside the FP32 one, :data:`INT8_GRAPH`)."""
OPENVINO_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
"""Always stated: OpenVINO would otherwise pick BF16 by itself on a CPU that has it. An INT8 graph's quantized
layers run in INT8 whatever the hint; the layers left in float run FP32, as they were gated."""
OPENVINO_FIXED_AXES = {"image": (0, 1, 2, 3, 4), "queries": (0,)}
"""The axes of each input OpenVINO compiles with the feed's size (compiled again when one changes); the others stay
dynamic. With the vision graph's window and batch fixed, the CPU plugin plans its buffers once, where a dynamic
batch costs far more memory per run (nano's window with 8 prompts: 9.5 GB fixed, 12.1 GB all dynamic, 15.5 GB with
only the image fixed; benchmarks/RESULTS.md, "OpenVINO's memory"). The prompt count, and the text encoder's
inputs, change from call to call and stay dynamic."""
INT8_GRAPH = "model.int8.xml"
"""The INT8 OpenVINO graph (NNCF post-training quantisation) in a vision version folder, beside model.onnx."""
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""The x86 instructions that make INT8 convolutions fast (/proc/cpuinfo names)."""


def check_runtime(runtime: str, precision: str = "fp32") -> None:
    """Refuse an unknown runtime or precision, and BF16 anywhere but OpenVINO on a CPU with native BF16."""
    if runtime not in RUNTIMES:
        raise SatInputError(f"unknown runtime {runtime!r}; accepted: {', '.join(RUNTIMES)}")
    if precision not in GRAPH_PRECISIONS:
        raise SatInputError(f"unknown graph precision {precision!r}; accepted: {', '.join(GRAPH_PRECISIONS)}")
    if precision == "bf16" and runtime != "openvino":
        raise SatInputError(f"bf16 runs on openvino only, not {runtime}")
    if precision == "bf16" and not openvino_has_native_bf16():
        raise SatInputError("bf16 needs a CPU with native BF16 (AVX512-BF16 or AMX); this one has none, use fp32")
    if precision == "int8" and runtime != "openvino":
        raise SatInputError(f"int8 runs on openvino only, not {runtime}")


def int8_acceleration() -> str:
    """The INT8 instructions this CPU has (:data:`INT8_CPU_FLAGS`, comma-separated), or ``""``: INT8 graphs still
    run there, but there is no reason to expect them faster than FP32."""
    try:
        flags = next(
            set(line.split(":", 1)[1].split())
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return ""
    return ", ".join(flag for flag in INT8_CPU_FLAGS if flag in flags)


def openvino_has_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native BF16 on this machine."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class GraphSession:
    """One ONNX graph opened with a graph runtime on the CPU.

    Args:
        path: the ``.onnx`` file.
        runtime: ``onnxruntime`` or ``openvino``.
        precision: ``fp32`` or ``bf16`` (see :func:`check_runtime`).
        threads: intra-op threads; 0 lets the runtime choose (all cores).
        low_memory: onnxruntime only: no arena and no memory pattern, so a run holds only its live tensors.
    """

    def __init__(
        self, path: Path, runtime: str, precision: str = "fp32", *, threads: int = 0, low_memory: bool = False
    ) -> None:
        check_runtime(runtime, precision)
        if runtime == "torch":
            raise SatInputError("torch runs the checkpoint, not a graph; pick onnxruntime or openvino")
        self.runtime = runtime
        self.precision = precision
        if runtime == "openvino":
            self._run = _openvino_runner(path, precision, threads)
        else:
            self._run = _onnxruntime_runner(path, threads, low_memory)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """The named ``outputs`` for ``feeds`` (input name -> array), as numpy arrays."""
        return self._run(feeds, outputs)


def _onnxruntime_runner(path: Path, threads: int, low_memory: bool) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    if low_memory:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        return session.run(list(outputs), dict(feeds))

    return run


def _openvino_runner(path: Path, precision: str, threads: int) -> Any:
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": threads}
    opened: dict[str, Any] = {}  # the fixed shapes, the request and its outputs: one compiled graph at a time
    unread = [core.read_model(str(path))]  # read now, so a bad file fails here; compiled at the first run

    def compiled_for(feeds: Mapping[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
        shapes = {
            name: [size if axis in axes else -1 for axis, size in enumerate(feeds[name].shape)]
            for name, axes in OPENVINO_FIXED_AXES.items()
            if name in feeds
        }
        if "request" not in opened or opened["shapes"] != shapes:
            opened.clear()  # the old graph's buffers go before the new one's are planned
            model = unread.pop() if unread else core.read_model(str(path))
            if shapes:
                model.reshape(shapes)
            compiled = core.compile_model(model, "CPU", config)
            names = {output.get_any_name(): output for output in compiled.outputs}
            opened.update(shapes=shapes, request=compiled.create_infer_request(), names=names)
        return opened["request"], opened["names"]

    def run(feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        request, names = compiled_for(feeds)
        # share_inputs: no copy in; the outputs are copied out, since the request reuses its buffers.
        request.infer(dict(feeds), share_inputs=True)
        return [np.array(request.get_tensor(names[name]).data) for name in outputs]

    return run
