"""Guards on the direction of imports (not metrics): the core never imports a pipeline stage (nor MONAI), and no
two folders import each other, directly or round a loop. Read from the sources' syntax trees, so an import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
STAGE_FOLDERS = {"training": "satseg_training", "export": "satseg_export", "clients": "satseg_clients"}
STAGE_FOLDERS["loadtest"] = "satseg_loadtest"
CORE = "satseg"
STAGE_NAMES = set(STAGE_FOLDERS) | set(STAGE_FOLDERS.values())
"""A stage by its installed name or its folder's (the bare name fails at import anyway, but is just as wrong)."""


def module_of(path: Path) -> str:
    """``satseg/engine/run.py`` -> ``satseg.engine.run``; a stage's folder by its installed name."""
    parts = list(path.relative_to(REPOSITORY).with_suffix("").parts)
    parts[0] = STAGE_FOLDERS.get(parts[0], parts[0])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> list[str]:
    """The package a relative import in ``path`` starts from."""
    module = module_of(path).split(".")
    return module if path.name == "__init__.py" else module[:-1]


def imported_modules(path: Path, package: list[str]) -> Iterator[str]:
    """Every module ``path`` (of ``package``) imports, anywhere in it, relative imports resolved."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            yield ".".join([*base, *([node.module] if node.module else [])])


def folder_of(module: str) -> str:
    """The unit the layering rule is about: a sub-package of the core, a top-level module of it, or a stage."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == CORE else parts[0]


def sources() -> list[Path]:
    return sorted(path for folder in (CORE, *STAGE_FOLDERS) for path in (REPOSITORY / folder).rglob("*.py"))


def folder_graph() -> dict[str, set[str]]:
    ours = {CORE, *STAGE_FOLDERS.values()}
    graph: dict[str, set[str]] = {}
    for path in sources():
        source = folder_of(module_of(path))
        imported = imported_modules(path, package_of(path))
        targets = {folder_of(module) for module in imported if module.split(".")[0] in ours}
        graph.setdefault(source, set()).update(targets - {source})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One loop of ``graph`` as a path that ends where it starts, or ``None``."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*trail[trail.index(target) :], target]
            if target not in state and (loop := visit(target)):
                return loop
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state and (loop := visit(node)):
            return loop
    return None


def upward_imports(path: Path, package: list[str]) -> list[str]:
    return [module for module in imported_modules(path, package) if module.split(".")[0] in STAGE_NAMES]


def test_the_core_imports_no_pipeline_stage() -> None:
    upward = [
        f"{path.relative_to(REPOSITORY)} imports {module}"
        for path in sorted((REPOSITORY / CORE).rglob("*.py"))
        for module in upward_imports(path, package_of(path))
    ]
    assert not upward, "the core must not know the stages above it: " + "; ".join(upward)


def test_the_core_never_imports_monai() -> None:
    """``import monai`` loads every MONAI module (3.8 s a process, 12% of a demo CT run on 2 cores): inference
    re-states the few functions it used (tests check them against MONAI's); training imports MONAI."""
    found = [
        f"{path.relative_to(REPOSITORY)} imports {module}"
        for path in sorted((REPOSITORY / CORE).rglob("*.py"))
        for module in imported_modules(path, package_of(path))
        if module.split(".")[0] == "monai"
    ]
    assert not found, "; ".join(found)


def test_no_two_folders_import_each_other() -> None:
    loop = find_cycle(folder_graph())
    assert loop is None, "folders import each other in a loop: " + " -> ".join(loop or [])


def test_the_guards_see_what_they_guard(tmp_path: Path) -> None:
    """The rules catch a planted upward import and a planted loop (so they cannot pass by seeing nothing)."""
    planted = tmp_path / "run.py"
    planted.write_text("import satseg_export\n\n\ndef f():\n    from export.build_repo import ExportSettings\n")
    assert upward_imports(planted, ["satseg", "engine"]) == ["satseg_export", "export.build_repo"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = folder_graph()
    assert "satseg.geometry" in graph["satseg.engine"] and "satseg.geometry" in graph["satseg_clients"]
