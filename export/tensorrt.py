"""TensorRT FP16 engines (``model.plan``) from the exported ONNX graphs, each with a manifest that pins it.

An engine runs only on the TensorRT version and GPU it was built for, so every plan gets a
``manifest.json`` beside it (TensorRT version, GPU name, compute capability, shape profiles, precision, the
ONNX sha256) and :func:`check_plan` refuses a plan whose manifest does not match the running GPU and
TensorRT. TensorRT is imported lazily: without it, building fails with one line saying where engines are
built (inside NVIDIA's Triton container, on the target GPU; see ``export/Dockerfile``), and everything else
here (profiles, manifests, the ``trtexec`` line) works and is tested without it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from satseg.errors import ExportError

MANIFEST_FILE = "manifest.json"
TIMING_CACHE_FILE = "timing.cache"
WORKSPACE_BYTES = 8 << 30
FP32_LAYER_TYPES = ("NORMALIZATION",)
"""TensorRT layer types kept in FP32 when ``keep_norms_fp32`` (InstanceNorm and LayerNorm both parse to it)."""
NO_TENSORRT = (
    "TensorRT is not installed here; engines are built on the target GPU inside NVIDIA's Triton container "
    "(see export/Dockerfile: docker run --gpus all ... sat-export CHECKPOINT --tensorrt)"
)


@dataclass(frozen=True)
class ShapeProfile:
    """One input's optimisation profile: its smallest, most frequent and largest shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"profile {self.name}: min, opt and max must have one rank")
        if any(not (a <= b <= c) for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"profile {self.name}: need min <= opt <= max on every axis, got {self}")


@dataclass(frozen=True)
class RuntimeIdentity:
    """What a plan is bound to: the TensorRT version and the GPU."""

    tensorrt: str
    gpu: str
    compute_capability: str


def vision_profiles(
    patch_size: tuple[int, int, int],
    d_model: int,
    batch: tuple[int, int, int] = (1, 2, 4),
    prompts: tuple[int, int, int] = (1, 16, 64),
) -> list[ShapeProfile]:
    """Profiles of the vision graph: ``image [B, 1, H, W, D]`` and ``queries [B, N, d]``, as (min, opt, max)."""
    image = [(b, 1, *patch_size) for b in batch]
    queries = [(b, n, d_model) for b, n in zip(batch, prompts, strict=True)]
    return [ShapeProfile("image", *image), ShapeProfile("queries", *queries)]


def text_profiles(
    batch: tuple[int, int, int] = (1, 32, 256), tokens: tuple[int, int, int] = (2, 16, 64)
) -> list[ShapeProfile]:
    """Profiles of the text-encoder graph: ``input_ids``/``attention_mask [B, L]`` and ``modality [B]``."""
    pairs = [(b, t) for b, t in zip(batch, tokens, strict=True)]
    return [
        ShapeProfile("input_ids", *pairs),
        ShapeProfile("attention_mask", *pairs),
        ShapeProfile("modality", *[(b,) for b in batch]),
    ]


def fp16_method(tensorrt_version: str) -> str:
    """How FP16 is obtained with this TensorRT: the one place that knows.

    TensorRT 10 has the ``BuilderFlag.FP16`` builder flag on the float32 ONNX (``"builder-flag"``). TensorRT 11
    removed it: networks are strongly typed, so the FP16 ONNX (``satseg_export.fp16``) is parsed as it is
    (``"strongly-typed-fp16-onnx"``).
    """
    major = int(tensorrt_version.split(".")[0])
    return "builder-flag" if major < 11 else "strongly-typed-fp16-onnx"


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(size) for size in shape)


def trtexec_command(
    onnx_path: Path, plan_path: Path, profiles: Sequence[ShapeProfile], *, method: str = "builder-flag"
) -> str:
    """The ``trtexec`` line that builds the same engine, for people who prefer it."""
    shapes = {
        kind: ",".join(f"{profile.name}:{_dims(getattr(profile, kind))}" for profile in profiles)
        for kind in ("min", "opt", "max")
    }
    precision = "--fp16" if method == "builder-flag" else "--stronglyTyped"
    return (
        f"trtexec --onnx={onnx_path} --saveEngine={plan_path} {precision} "
        f"--minShapes={shapes['min']} --optShapes={shapes['opt']} --maxShapes={shapes['max']} "
        f"--timingCacheFile={plan_path.parent / TIMING_CACHE_FILE}"
    )


def write_manifest(
    plan_path: Path,
    runtime: RuntimeIdentity,
    profiles: Sequence[ShapeProfile],
    *,
    precision: str,
    method: str,
    onnx_sha256: str,
    fp32_layers: Sequence[str],
) -> Path:
    """Write ``manifest.json`` beside ``plan_path``; returns its path."""
    manifest = {
        **asdict(runtime),
        "precision": precision,
        "fp16_method": method,
        "fp32_layer_types": list(fp32_layers),
        "profiles": {
            profile.name: {"min": profile.min, "opt": profile.opt, "max": profile.max} for profile in profiles
        },
        "onnx_sha256": onnx_sha256,
        "plan": plan_path.name,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = plan_path.parent / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(plan_path: Path) -> dict[str, Any]:
    """The manifest beside ``plan_path``.

    Raises:
        ExportError: no manifest, or not JSON (a plan of unknown origin is never loaded).
    """
    path = plan_path.parent / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{plan_path} has no {MANIFEST_FILE} beside it; rebuild it with sat-export --tensorrt"
        ) from None
    except json.JSONDecodeError as error:
        raise ExportError(
            f"{path} is not valid JSON ({error.msg}); rebuild the plan with sat-export --tensorrt"
        ) from None


def check_plan(plan_path: Path, runtime: RuntimeIdentity) -> dict[str, Any]:
    """The plan's manifest, when it was built for ``runtime``.

    Raises:
        ExportError: the TensorRT version, GPU name or compute capability differ (all differences named).
    """
    manifest = read_manifest(plan_path)
    built = {key: manifest.get(key) for key in ("tensorrt", "gpu", "compute_capability")}
    mismatches = [f"{key} {built[key]} (here {value})" for key, value in asdict(runtime).items() if built[key] != value]
    if mismatches:
        raise ExportError(
            f"{plan_path} was built for {', '.join(mismatches)}; rebuild it on this machine with sat-export --tensorrt"
        )
    return manifest


def current_runtime() -> RuntimeIdentity:
    """The TensorRT version and GPU of this process.

    Raises:
        ExportError: no TensorRT or no CUDA GPU.
    """
    trt = _import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT engines need a CUDA GPU and none is visible")
    major, minor = torch.cuda.get_device_capability()
    return RuntimeIdentity(trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}")


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profiles: Sequence[ShapeProfile],
    *,
    onnx_sha256: str,
    fp16: bool = True,
    keep_norms_fp32: bool = False,
) -> Path:
    """Build ``plan_path`` from ``onnx_path`` with one optimisation profile, FP16 when asked; writes the manifest.

    With TensorRT 11 and ``fp16``, ``onnx_path`` must be the FP16 ONNX (:func:`fp16_method`). The timing
    cache (``timing.cache`` beside the plan) is read when present and written back, so rebuilds are fast.

    Raises:
        ExportError: no TensorRT or GPU, an ONNX the parser refuses (its errors listed), a failed build.
    """
    trt = _import_tensorrt()
    runtime = current_runtime()
    method = fp16_method(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = fp16 and method == "strongly-typed-fp16-onnx"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for item in profiles:
        profile.set_shape(item.name, item.min, item.opt, item.max)
    config.add_optimization_profile(profile)
    fp32_layers: list[str] = []
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        if keep_norms_fp32:
            fp32_layers = _pin_layers_fp32(trt, network, config)
    cache_path = plan_path.parent / TIMING_CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    precision = "fp16" if fp16 else "fp32"
    write_manifest(
        plan_path,
        runtime,
        profiles,
        precision=precision,
        method=method,
        onnx_sha256=onnx_sha256,
        fp32_layers=fp32_layers,
    )
    return plan_path


def _pin_layers_fp32(trt: Any, network: Any, config: Any) -> list[str]:
    """Keep normalisation layers (and their outputs) in FP32 under the FP16 flag; returns the type names pinned."""
    pinned = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in pinned:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return list(FP32_LAYER_TYPES)


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise ExportError(NO_TENSORRT) from None
    return tensorrt
