"""The package's layering rule (see openllm/__init__.py), checked on the import graph of the source."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "openllm"
# Layers in order; a module may import its own layer and the ones before it, except where FORBIDDEN says no.
LAYERS = {
    "core": 0,
    "data": 1,
    "model": 2,
    "checkpoint": 3,
    "interop": 4,
    "training": 5,
    "inference": 5,
    "cli": 6,
    "__main__": 6,
}
FORBIDDEN = {
    ("interop", "training"),
    ("interop", "inference"),
    ("inference", "training"),
    ("training", "inference"),
    ("training", "interop"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every openllm module ``name`` imports, at the top or inside functions."""
    path = MODULES[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "openllm")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "openllm":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m != name}


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "core"  # the root package holds only __version__ and the error type


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_belongs_to_a_layer():
    assert {layer_of(m) for m in MODULES} <= set(LAYERS), sorted({layer_of(m) for m in MODULES} - set(LAYERS))
    assert len(MODULES) > 30  # the walk really found the package


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name):
    mine = layer_of(name)
    for target in GRAPH[name]:
        theirs = layer_of(target)
        assert (mine, theirs) not in FORBIDDEN, f"{name} imports {target}: {mine} must not import {theirs}"
        assert LAYERS[theirs] <= LAYERS[mine], f"{name} ({mine}) imports {target} from the higher layer {theirs}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert ("interop", "training") in FORBIDDEN and LAYERS["interop"] < LAYERS["training"]
