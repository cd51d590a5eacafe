"""The package's structural rules, checked on its source: the layering (see openllm/__init__.py) on the import
graph, and that only openllm/checkpoint/format.py reads a checkpoint by its keys."""

import ast
import re
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
    "finetune": 5,
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


# ------------------------------------------------------------------------- checkpoint keys

FORMAT = PACKAGE / "checkpoint" / "format.py"
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
# A value is a checkpoint when its name says so, when a checkpoint loader returned it, when it was assigned from
# one in the same function, or when it was read from one by a checkpoint key (``ckpt["resume_state"]``).
CHECKPOINT_NAME = re.compile(r"ckpt|checkpoint", re.IGNORECASE)
LOADERS = {"load_checkpoint", "load_verified", "build_checkpoint"}


def checkpoint_keys() -> set[str]:
    """The keys format.py declares (LEGACY_KEYS, REQUIRED_KEYS, RESUME_KEYS, LORA_KEYS), read from its source."""
    tuples: dict[str, tuple] = {}

    def value(node: ast.expr) -> tuple:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)
        return tuples[node.id] if isinstance(node, ast.Name) else ast.literal_eval(node)

    for node in ast.parse(FORMAT.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("LEGACY_KEYS", "REQUIRED_KEYS", "RESUME_KEYS", "LORA_KEYS"):
                tuples[name] = value(node.value)
    assert set(tuples) == {"LEGACY_KEYS", "REQUIRED_KEYS", "RESUME_KEYS", "LORA_KEYS"}, sorted(tuples)
    return set(tuples["REQUIRED_KEYS"]) | set(tuples["RESUME_KEYS"]) | set(tuples["LORA_KEYS"])


CHECKPOINT_KEYS = checkpoint_keys()


def key_read(node: ast.AST) -> tuple[str, ast.expr] | None:
    """(key, receiver) of ``x["key"]``, ``x.get("key", ...)`` (also pop, setdefault) or ``"key" in x``."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        key, receiver = node.slice.value, node.value
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("get", "pop", "setdefault")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        key, receiver = node.args[0].value, node.func.value
    elif (
        isinstance(node, ast.Compare)
        and isinstance(node.left, ast.Constant)
        and len(node.ops) == 1
        and isinstance(node.ops[0], (ast.In, ast.NotIn))
    ):
        key, receiver = node.left.value, node.comparators[0]
    else:
        return None
    return (key, receiver) if isinstance(key, str) and key in CHECKPOINT_KEYS else None


def is_checkpoint(node: ast.expr, names: set[str]) -> bool:
    while isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):  # ckpt or {}
        node = node.values[0]
    read = key_read(node)
    if read is not None:
        return is_checkpoint(read[1], names)
    if isinstance(node, ast.Name):
        return node.id in names or bool(CHECKPOINT_NAME.search(node.id))
    if isinstance(node, ast.Attribute):
        return bool(CHECKPOINT_NAME.search(node.attr))
    if isinstance(node, ast.Call):
        func = node.func
        return (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) in LOADERS
    return False


def own_nodes(scope: ast.AST):
    """The nodes of a module or function, not those of the functions defined inside it."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def checkpoint_key_reads(source: str, where: str = "<code>") -> list[str]:
    """Every checkpoint key read from a checkpoint in ``source``, as 'where:line: ...'."""
    found: list[tuple[int, str]] = []

    def visit(scope: ast.AST, inherited: set[str]) -> None:
        nodes = list(own_nodes(scope))
        pairs = []
        for node in nodes:
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs.extend(zip(target.elts, node.value.elts, strict=False))
                    else:
                        pairs.append((target, node.value))
        names, grown = set(inherited), True
        while grown:  # assignments in any order: a name is a checkpoint once any value it is given is one
            before = len(names)
            names |= {t.id for t, v in pairs if isinstance(t, ast.Name) and is_checkpoint(v, names)}
            grown = len(names) > before
        for node in nodes:
            read = key_read(node)
            if read and is_checkpoint(read[1], names):
                found.append((node.lineno, f"{where}:{node.lineno}: reads {read[0]!r} from {ast.unparse(read[1])}"))
            if isinstance(node, SCOPES):
                visit(node, names)

    visit(ast.parse(source), set())
    return [text for _, text in sorted(set(found))]


def test_checkpoint_keys_are_read_only_in_the_format_module():
    offenders = [
        line
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != FORMAT
        for line in checkpoint_key_reads(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    ]
    assert not offenders, (
        "read checkpoints through openllm.checkpoint.format (read_info's CheckpointView), not by their keys:\n"
        + "\n".join(offenders)
    )


def test_the_checkpoint_key_check_can_fail():
    flagged = checkpoint_key_reads(
        "def f(path, ckpt):\n"
        "    a = ckpt['step']\n"
        "    raw = load_checkpoint(path)\n"
        "    b = raw.get('config')\n"
        "    resume = ckpt.get('resume_state') or {}\n"
        "    c = resume['world_size']\n"
        "    d = 'model_state_dict' in self.checkpoint\n"
        "    e = ck.load_verified(path, 'x').get('provenance')\n"
        "    return lambda: raw['training_config']\n"
    )
    assert [line.split(": ")[1] for line in flagged] == [
        "reads 'step' from ckpt",
        "reads 'config' from raw",
        "reads 'resume_state' from ckpt",
        "reads 'world_size' from resume",
        "reads 'model_state_dict' from self.checkpoint",
        "reads 'provenance' from ck.load_verified(path, 'x')",
        "reads 'training_config' from raw",
    ], flagged
    ordinary = (
        "def g(record, meta, ckpt):\n"
        "    a = record['step']\n"  # a log record, not a checkpoint
        "    b = meta.get('tokenizer_sha256')\n"  # dataset metadata
        "    c = ckpt['iter_num']\n"  # not a key of OpenLLM's format
        "    d = {'step': 1}['step']\n"
    )
    assert checkpoint_key_reads(ordinary) == []
    assert {"step", "resume_state", "world_size", "run_state", "model_state_dict", "lora_base"} <= CHECKPOINT_KEYS
