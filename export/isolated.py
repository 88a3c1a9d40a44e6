"""Run one function in a fresh process, so the memory it took is handed back to the system when it returns.

A large model's PyTorch module and an onnxruntime session with its arena do not fit in one process on a
small machine (nano: about 22 GB for onnxruntime's 288x288x96 window alone), and neither allocator returns
all of its memory after a run. A spawned child does, by exiting.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable
from typing import Any


def run_isolated(target: Callable[..., None], *args: Any) -> Any:
    """``target(*args, results)`` in a spawned process; returns the one value it put on ``results``.

    ``target`` must be a module-level function (spawn imports it by name) that puts exactly one small value on
    ``results``; large outputs go through files.

    Raises:
        RuntimeError: the child exited non-zero (-9: killed, usually out of memory) or returned nothing.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=target, args=(*args, results))
    child.start()
    child.join()
    if child.exitcode != 0:
        hint = " (killed, usually out of memory)" if child.exitcode == -9 else ""
        raise RuntimeError(f"{target.__name__} exited with {child.exitcode}{hint}")
    try:
        return results.get(timeout=10)
    except queue.Empty:
        raise RuntimeError(f"{target.__name__} returned nothing") from None
