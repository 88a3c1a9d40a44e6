"""How a caller runs the engine: :class:`InferenceOptions` (windows, runtime, precision, spec overrides) and the
checks of a device and a precision, apart from the in-process :class:`~satseg.pipeline.Segmenter` so that the
served segmenter takes the options without the predictor."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from satseg.engine.run import WindowRun
from satseg.errors import SatInputError
from satseg.runtimes import check_runtime
from satseg.spec import ModelSpec


@dataclass(frozen=True)
class InferenceOptions:
    """How windows are run, and what a caller overrides of the checkpoint's spec (:mod:`satseg.spec`).

    ``overlap``, ``threshold`` and ``orientation`` are ``None`` unless the caller overrides the spec (the CLI's
    ``--overlap``, ``--threshold`` and ``--orientation``, for a sagittal scan): the spec decides all it states.
    ``prompts_per_pass`` bounds memory: each pass holds that many fp16 probability maps of the model grid
    (2 bytes per voxel each) and window logits; more prompts take more passes over the windows. ``None``: as
    many as :data:`~satseg.engine.run.PASS_BYTES` holds.
    ``runtime`` runs the vision model: ``torch`` (the checkpoint), or ``onnxruntime`` or ``openvino`` on its
    exported graph (CPU; :mod:`satseg.runtimes`). ``precision`` is its arithmetic: ``fp32``; ``fp16`` (torch on
    CUDA, autocast); ``bf16`` (openvino on a CPU with native BF16); ``int8`` (openvino on the INT8 graph that
    ``sat-export`` gated). Logits come back float32.
    ``keep_largest_component``: a structure the spec lists as one connected body keeps only the largest
    connected piece of its ``> threshold`` mask (its other pieces get probability 0).
    """

    overlap: float | None = None
    runtime: str = "torch"
    precision: str = "fp32"
    threshold: float | None = None
    keep_largest_component: bool = True
    batch_size: int = 1
    accumulator_dtype: torch.dtype = torch.float16
    prompts_per_pass: int | None = None
    orientation: str | None = None

    def applied_to(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with this caller's overrides."""
        window = spec.window if self.overlap is None else replace(spec.window, overlap=self.overlap)
        post = spec.postprocess if self.threshold is None else replace(spec.postprocess, threshold=self.threshold)
        spec = replace(spec, window=window, postprocess=post)
        return spec if self.orientation is None else spec.with_overrides(orientation=self.orientation)

    def window_run(self, device: torch.device, progress: bool = False) -> WindowRun:
        """How the engine runs windows for these options on ``device``."""
        return WindowRun(self.batch_size, self.prompts_per_pass, self.accumulator_dtype, device, progress)


PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def check_precision(precision: str, device: torch.device, runtime: str = "torch") -> None:
    """Refuse what ``runtime`` cannot run on ``device``: fp16 only for torch on CUDA (CPU convolutions have no
    fast fp16 kernels), bf16 only for openvino on a CPU with native BF16, graph runtimes only on the CPU."""
    if precision not in PRECISIONS:
        raise SatInputError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if runtime != "torch":
        if device.type != "cpu":
            raise SatInputError(f"runtime {runtime} runs on the CPU, not {device}; on a GPU use torch")
        if precision == "fp16":
            raise SatInputError(f"precision fp16 is for torch on CUDA; {runtime} runs fp32 (openvino also bf16)")
        check_runtime(runtime, precision)
        return
    if precision == "fp16" and device.type != "cuda":
        raise SatInputError(f"precision fp16 needs a CUDA device, not {device}; the CPU runs fp32")
    if precision in ("bf16", "int8"):
        raise SatInputError(f"precision {precision} is for --runtime openvino; torch runs fp32 (fp16 on CUDA)")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (refused with a clear message when absent) or ``auto``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SatInputError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise SatInputError(f"unknown device {name!r}; accepted: cpu, cuda, cuda:N, auto")
    return torch.device(name)
