"""The ``--runtime``, ``--graph`` and ``--precision`` options that every CLI running the vision model shares."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from satseg.checkout import DEFAULT_REPOSITORY
from satseg.checkpoint import DeferredCheckpoint
from satseg.contract import CONTRACT_FILE, ENTRY_MODEL
from satseg.engine.options import PRECISIONS, InferenceOptions, check_precision
from satseg.errors import SatInputError
from satseg.pipeline import Segmenter
from satseg.runtimes import INT8_GRAPH, RUNTIMES, int8_acceleration


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
        help="vision model arithmetic: fp32 (default), fp16 (torch on CUDA, autocast), bf16 (openvino on a CPU "
        "with native BF16) or int8 (openvino on the INT8 graph `sat-export --int8` gated)",
    )


def check_runtime_arguments(args: argparse.Namespace) -> None:
    """Refuse ``--graph`` without a graph runtime, or naming no file."""
    if args.graph is not None and args.runtime == "torch":
        raise SatInputError("--graph is for --runtime onnxruntime or openvino; torch runs the checkpoint itself")
    if args.graph is not None and not args.graph.is_file():
        raise SatInputError(f"--graph {args.graph} is not a file; expected a vision model.onnx (or model.int8.xml)")


def default_int8_graph(checkpoint: DeferredCheckpoint) -> Path:
    """The INT8 graph that ``sat-export --int8`` gated for ``checkpoint``'s weights in the checkout's repository.

    Raises:
        SatInputError: there is none for these weights (one line: how to make one, or pass ``--graph``).
    """
    graph = DEFAULT_REPOSITORY / "vision" / "1" / INT8_GRAPH
    try:
        contract = json.loads((DEFAULT_REPOSITORY / ENTRY_MODEL / CONTRACT_FILE).read_text())
        exported_from = contract["checkpoint"]["weights_sha256"]
    except (OSError, ValueError, KeyError):
        exported_from = None
    if not graph.is_file() or exported_from != checkpoint.weights_sha256:
        raise SatInputError(
            f"--precision int8 needs an INT8 graph gated for these weights: `sat-export {checkpoint.folder} --int8` "
            "installs one where it holds its Dice gate (see its report), or pass --graph REPOSITORY/vision/1/"
            f"{INT8_GRAPH}"
        )
    return graph


def segmenter_for(
    args: argparse.Namespace, checkpoint: Path, device: torch.device, options: InferenceOptions, **kwargs: object
) -> Segmenter:
    """The ``Segmenter`` of ``checkpoint`` on the runtime the arguments name: its graph exported and its prompts'
    embeddings computed on first use, both kept under :func:`~satseg.graph_cache.cache_root`, so a graph runtime
    builds the model only for what that folder lacks.

    ``options`` must carry ``args.runtime`` and ``args.precision``; they are checked before anything loads.
    """
    from satseg.graph_cache import EMBEDDINGS_FOLDER, cache_root, cached_vision_graph

    check_precision(options.precision, device, options.runtime)
    checkpoint_files = DeferredCheckpoint(checkpoint)
    graph = None
    if options.runtime != "torch":
        graph = args.graph or (
            default_int8_graph(checkpoint_files)
            if options.precision == "int8"
            else cached_vision_graph(checkpoint_files)
        )
        if options.precision == "int8" and not int8_acceleration():
            print(
                "warning: this CPU has no AVX512-VNNI, AVX-VNNI or AMX: INT8 may be no faster than FP32",
                file=sys.stderr,
            )
    embeddings = cache_root() / EMBEDDINGS_FOLDER
    return Segmenter(checkpoint_files, device=device, options=options, graph=graph, cache_dir=embeddings, **kwargs)  # type: ignore[arg-type]
