"""lowrank_fused.peft's modules import one another without a cycle (issue 29, item 7), counting
imports inside functions too: a cycle hidden in a function still ties two modules together."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_fused" / "peft"


def _sibling_imports(path: Path) -> set:
    """The modules of lowrank_fused.peft that ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:  # from . import x, y
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "lowrank_fused.peft."):
            names.add(node.module.split(".")[2])
    return names


def _graph() -> dict:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _sibling_imports(path) & set(modules) for name, path in modules.items()}


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_peft_modules_import_each_other_without_a_cycle():
    graph = _graph()
    assert {"serving", "qlora"} <= set(graph)
    assert "serving" in graph["qlora"]  # the checker sees the imports it must see
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
