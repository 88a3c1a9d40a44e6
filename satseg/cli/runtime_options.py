"""The ``--runtime``, ``--graph`` and ``--precision`` options that every CLI running the vision model shares."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from satseg.checkpoint import load_checkpoint
from satseg.engine.options import PRECISIONS, InferenceOptions, check_precision
from satseg.errors import SatInputError
from satseg.pipeline import Segmenter
from satseg.runtimes import RUNTIMES


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--runtime``, ``--graph`` and ``--precision`` to ``parser``."""
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="what runs the vision model: torch (default), or onnxruntime or openvino on its ONNX graph (CPU; "
        "exported once into $SATSEG_CACHE, default ~/.cache/satseg)",
    )
    parser.add_argument(
        "--graph",
        type=Path,
        help="with --runtime onnxruntime|openvino: the vision graph to run, e.g. an exported repository's "
        "vision/1/model.onnx (default: this checkpoint's, exported once into the cache)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="vision model arithmetic: fp32 (default), fp16 (torch on CUDA, autocast) or bf16 (openvino on a CPU "
        "with native BF16)",
    )


def check_runtime_arguments(args: argparse.Namespace) -> None:
    """Refuse ``--graph`` without a graph runtime, or naming no file."""
    if args.graph is not None and args.runtime == "torch":
        raise SatInputError("--graph is for --runtime onnxruntime or openvino; torch runs the checkpoint itself")
    if args.graph is not None and not args.graph.is_file():
        raise SatInputError(f"--graph {args.graph} is not a file; expected a vision model.onnx")


def segmenter_for(
    args: argparse.Namespace, checkpoint: Path, device: torch.device, options: InferenceOptions, **kwargs: object
) -> Segmenter:
    """The ``Segmenter`` of ``checkpoint`` on the runtime the arguments name (its graph exported on first use).

    ``options`` must carry ``args.runtime`` and ``args.precision``; they are checked before anything loads.
    """
    check_precision(options.precision, device, options.runtime)
    model, metadata = load_checkpoint(checkpoint, device=device)
    graph = None
    if options.runtime != "torch":
        from satseg.graph_cache import cached_vision_graph  # torch.onnx and onnxscript: only for a graph runtime

        graph = args.graph or cached_vision_graph(checkpoint, model)
    return Segmenter(model, device=device, options=options, metadata=metadata, graph=graph, **kwargs)  # type: ignore[arg-type]
