"""Package attributes imported on first use, so a light install (``satseg[client]``) never imports torch.

A hand-written PEP 562 ``__getattr__``: the standard library has no helper for it, and the packages that
offer one (``lazy_loader``) would be a dependency for ten lines.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``sources[name]`` (a submodule of ``package``) when ``name`` is read."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{sources[name]}"), name)

    return __getattr__
