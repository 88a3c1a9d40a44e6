"""ONNX graphs of a SAT checkpoint, the two halves Triton serves.

- **Text encoder**: ``input_ids [B, L]`` int64, ``attention_mask [B, L]`` int64, ``modality [B]`` int64 ->
  ``queries [B, d_model]`` float32: the whole text tower (encoder, mean pooling, projection, modality
  embedding), so a served query equals :meth:`satseg.model.SAT.encode_prompts`.
- **Vision**: ``image [B, 1, H, W, D]`` float32 (z-scored), ``queries [B, N, d_model]`` float32 ->
  ``logits [B, N, H, W, D]`` float32. ``B`` and ``N`` are dynamic; ``(H, W, D)`` is the checkpoint's patch.

Each graph is checked with ``onnx.checker`` and saved with a ``<file>.sha256`` beside it (``sha256sum -c``
format), the identity TensorRT manifests and the model repository refer to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from satseg.model import SAT
from satseg.text import PromptTokenizer, resolve_text_encoder

OPSET = 18
"""The dynamo exporter's lowest opset; >= 17 keeps LayerNormalization one op (FP16-safe in TensorRT)."""
MAX_BATCH = 64
MAX_PROMPTS = 512
MAX_TOKENS = 512
TEXT_INPUTS = ("input_ids", "attention_mask", "modality")
TEXT_OUTPUTS = ("queries",)
VISION_INPUTS = ("image", "queries")
VISION_OUTPUTS = ("logits",)
EXAMPLE_PROMPTS = ("liver", "left kidney", "right cerebral white matter")


@dataclass(frozen=True)
class ExportedGraph:
    """An ONNX file written by this module.

    Attributes:
        path: the ``.onnx`` file.
        sha256: hex digest of its bytes (also in ``<path>.sha256``).
        inputs / outputs: name -> shape, dynamic axes by name (``"batch"``), as the graph declares them.
    """

    path: Path
    sha256: str
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_text_encoder(sat: SAT, path: Path) -> ExportedGraph:
    """Write the text tower of ``sat`` as ONNX at ``path`` (dynamic batch and token axes)."""
    tokenizer = PromptTokenizer(resolve_text_encoder(sat.config.text_encoder))
    tokens = tokenizer(list(EXAMPLE_PROMPTS))
    example = (tokens["input_ids"], tokens["attention_mask"], torch.tensor([0, 0, 1]))
    batch = torch.export.Dim("batch", min=1, max=MAX_PROMPTS)
    length = torch.export.Dim("tokens", min=2, max=MAX_TOKENS)
    dynamic = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}, "modality_ids": {0: batch}}
    return _export(sat.text, example, dynamic, TEXT_INPUTS, TEXT_OUTPUTS, path)


def export_vision(sat: SAT, path: Path) -> ExportedGraph:
    """Write the vision model of ``sat`` as ONNX at ``path`` (dynamic batch and prompts, fixed patch)."""
    config = sat.config
    example = (torch.randn(2, 1, *config.patch_size), torch.randn(2, 3, config.d_model))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    prompts = torch.export.Dim("prompts", min=1, max=MAX_PROMPTS)
    dynamic = {"image": {0: batch}, "queries": {0: batch, 1: prompts}}
    return _export(sat.vision, example, dynamic, VISION_INPUTS, VISION_OUTPUTS, path)


def _export(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    dynamic_shapes: dict[str, dict[int, torch.export.Dim]],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    path: Path,
) -> ExportedGraph:
    import onnx  # the export extra; imported here so satseg stays importable without it

    was_training = module.training
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # dynamo=True: the TorchScript exporter turns the bottleneck grid (read from the traced shape) into a
    # non-constant pooling kernel once the batch axis is dynamic, and fails; torch.export keeps it static.
    # The exporter narrates each step and warns about its internals (missing torchvision ops, constant
    # folding): a CLI's output stays ours. Failures still raise, with their message.
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
        program.save(str(path))
    module.train(was_training)
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))  # by path: works past the 2 GB protobuf limit too
    sha256 = file_sha256(path)
    path.with_name(path.name + ".sha256").write_text(f"{sha256}  {path.name}\n")
    return ExportedGraph(path, sha256, graph_shapes(model.graph.input), graph_shapes(model.graph.output))


def graph_shapes(values: object) -> dict[str, list[int | str]]:
    """Name -> shape of ONNX graph inputs or outputs; a dynamic axis is its name (``"batch"``)."""
    return {
        value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]  # type: ignore[attr-defined]
        for value in values  # type: ignore[attr-defined]
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence stdout, stderr, warnings and the exporter's loggers for the duration."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
