"""The package's layering, checked from the source (docs/architecture.md).

Why a test: the layers are what lets someone carry the code on (a new method does not need to
know the CLI; a torch upgrade breaks one file), and they erode one convenient import at a time.
Imports are read with ``ast`` (nothing is executed); module-level imports form the graph, since
an import inside a function is the sanctioned way to reach upwards lazily (e.g. optional
packages) and cannot form an import-time cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ggda"

#: Packages (or top-level modules) by layer; a unit may import only units of a lower or equal rank.
LIBRARY = {
    "errors": 0, "buffers": 0, "io": 0, "paths": 0, "options": 0, "progress": 0, "arrays": 0, "outputs": 0,
    "data": 1, "models": 2, "task": 3, "properties": 3, "linalg": 4, "gradients": 4,
    "groups": 5, "methods": 6, "execution": 6, "store": 7, "gold": 7, "evaluate": 7,
    "integrations": 7, "runs": 8, "results": 8,
}  # fmt: skip
UPPER = {"applications": 9, "report": 10, "cli": 11}


def _unit(module: str) -> str:
    """``ggda.methods.influence`` -> ``methods``; ``ggda.task`` -> ``task``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _top_level_imports(tree: ast.Module, module: str) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of the imports executed at import time."""
    found = []
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in tree.body:
        stmts = [node]
        if isinstance(node, ast.If):  # TYPE_CHECKING blocks do not run
            continue
        if isinstance(node, ast.Try):
            stmts = node.body
        for stmt in stmts:
            if isinstance(stmt, ast.ImportFrom):
                base = stmt.module or ""
                if stmt.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - stmt.level + 1] + [base])
                found.append((base.rstrip("."), [a.name for a in stmt.names]))
            elif isinstance(stmt, ast.Import):
                found += [(a.name, []) for a in stmt.names]
    return [(m, names) for m, names in found if m == "ggda" or m.startswith("ggda.")]


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()} - {""}
    assert units <= set(LIBRARY) | set(UPPER), sorted(units - set(LIBRARY) - set(UPPER))


def test_imports_only_go_down_the_layers():
    rank = {**LIBRARY, **UPPER}
    upward = []
    for module, tree in _modules().items():
        here = _unit(module)
        if not here:
            continue
        for target, _ in _top_level_imports(tree, module):
            there = _unit(target)
            if there and there != here and rank[there] > rank[here]:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_cycles_between_units():
    graph: dict[str, set[str]] = {}
    for module, tree in _modules().items():
        here = _unit(module)
        for target, _ in _top_level_imports(tree, module):
            there = _unit(target)
            if here and there and there != here:
                graph.setdefault(here, set()).add(there)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(u for u in graph if reaches(u, u, {u}))
    assert not cycles, cycles


def test_no_private_names_imported_across_units():
    crossing = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):  # function-level imports too
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("ggda"):
                continue
            if _unit(node.module) == _unit(module):
                continue
            crossing += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not crossing, crossing
