"""The vision graph of a checkpoint for the in-process graph runtimes, exported once and kept in a cache,
beside the prompt embeddings of checkpoints.

``sat-segment --runtime onnxruntime|openvino`` needs the checkpoint's vision model as ONNX; exporting it
takes seconds for ``tiny`` and minutes for ``nano``, so the graph is kept under the cache folder, named by
the sha256 of the weights and the exporter's opset: new weights get a new graph, never a stale one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from satseg.checkpoint import DeferredCheckpoint
from satseg.onnx_graphs import OPSET, export_vision

CACHE_VARIABLE = "SATSEG_CACHE"
"""The cache folder (default ``$XDG_CACHE_HOME/satseg``, else ``~/.cache/satseg``)."""
GRAPH_FILE = "vision.onnx"
EMBEDDINGS_FOLDER = "embeddings"
"""Prompt embeddings of checkpoints (:class:`~satseg.text.EmbeddingCache`), under :func:`cache_root`."""


def cache_root() -> Path:
    """Where cached graphs live: ``$SATSEG_CACHE``, else ``$XDG_CACHE_HOME/satseg``, else ``~/.cache/satseg``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "satseg"


def cached_vision_graph(checkpoint: DeferredCheckpoint) -> Path:
    """``checkpoint``'s vision graph, exported from its model on first use.

    The graph is written into a temporary folder beside its place and renamed in one step, so a second
    process never reads half a file and an interrupted export leaves nothing behind.
    """
    key = f"{checkpoint.weights_sha256[:16]}-opset{OPSET}"
    folder = cache_root() / "graphs" / key
    graph = folder / GRAPH_FILE
    if graph.is_file():
        return graph
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        export_vision(checkpoint.model(), work / GRAPH_FILE)
        try:
            os.rename(work, folder)
        except OSError:  # another process put it there first: theirs is the same graph
            if not graph.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return graph
