"""The layer order of docs/ARCHITECTURE.md, checked on the source: every import of every module in globe/
(module level and inside functions, parsed with ast, never executed) goes to the same or a lower layer, and the
import graph has no cycle. Imports under `if TYPE_CHECKING:` are annotations only and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "globe"

# Bottom to top; a module may import modules of its own layer or of lower ones. The first matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("globe.core", "globe.errors", "globe.device", "globe.progress", "globe.tracking", "globe.assets",
              "globe.quant")),
    ("io", ("globe.io",)),
    ("formats", ("globe.formats",)),
    ("calibration", ("globe.calibration",)),
    ("fit", ("globe.fit",)),
    ("artifact", ("globe.artifact",)),
    ("runtime", ("globe.runtime",)),
    ("export", ("globe.export",)),
    ("tune", ("globe.tune",)),
    ("eval", ("globe.eval",)),
    ("run", ("globe.run",)),
    ("front ends", ("globe.cli", "globe.hydra_app", "globe.fit_banks", "globe")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """globe modules an import statement loads: `from globe import tracking` is globe.tracking, not globe."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:                                                       # relative import
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        package = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}" if base else package
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return subs if len(subs) == len(node.names) else [base, *subs]


def imports_of(module: str) -> set[str]:
    """Every globe module `module` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(t for t in _targets(child, module) if t == "globe" or t.startswith("globe."))
            visit(child)

    visit(ast.parse(MODULES[module].read_text(), filename=str(MODULES[module])))
    return {t for t in found if t != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > layer_of(module))
    assert not upward, (f"{module} ({LAYERS[layer_of(module)][0]}) imports higher layers: "
                        + ", ".join(f"{t} ({LAYERS[layer_of(t)][0]})" for t in upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search, colours)."""
    state: dict[str, int] = {}                                            # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """The checker itself: an upward edge and a cycle in a made-up graph are found; TYPE_CHECKING is skipped."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("globe.runtime.apply") > layer_of("globe.fit.engine") > layer_of("globe.io.reader")
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import globe.fit\n")
    assert _is_type_checking(tree.body[1])
    assert _targets(ast.parse("from globe import tracking").body[0], "globe.fit.solvers.am") == ["globe.tracking"]
    assert _targets(ast.parse("from globe import fit_model").body[0], "globe.run.fit") == ["globe"]
