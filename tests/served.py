"""Volumes and comparisons shared by the tests against the real server (test_serving, test_client)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from satseg.geometry import Volume
from satseg.phantom import centred_affine, make_torso_phantom
from satseg.pipeline import Segmenter

MIN_AGREEMENT = 0.999
"""Served masks may differ from the in-process ones by float noise at the 0.5 boundary, nothing more."""


def phantom(seed: int, shape: tuple[int, int, int] = (48, 40, 24), degrees: float = 15.0) -> Volume:
    """A small torso CT (int16 HU) on an oblique, anisotropic grid."""
    affine = centred_affine(shape, (5.0, 5.0, 8.0), degrees)
    volume, _, _ = make_torso_phantom(shape, affine, seed=seed)
    return Volume(volume.array.astype(np.int16), volume.affine, "ct")


def reference_masks(reference: Segmenter, volume: Volume, modality: str, prompts: list[str]) -> np.ndarray:
    """``[N, I, J, K]`` uint8: the in-process result for ``prompts``."""
    terms = reference.resolve_prompts(prompts)
    return reference.segment(volume, terms, modality).masks


def served_cpu_runtime(repository: Path) -> tuple[str, Path]:
    """The runtime the CPU config runs ``vision`` with (``configs/cpu.pbtxt``'s ``runtime``) and its graph: what
    an in-process run needs to give the served masks exactly."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = (repository / "vision" / "configs" / "cpu.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return config.parameters["runtime"].string_value, repository / "vision" / "1" / "model.onnx"


def agreement(served: np.ndarray, expected: np.ndarray) -> float:
    """Fraction of voxels where two masks agree."""
    return float((served.astype(bool) == expected).mean())
