"""Properties of the codebase itself (docs/architecture.md): no import circle between the package's modules, lazy
imports (inside functions, under TYPE_CHECKING) included; the arm registry knows no implementation."""

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"


def _module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in (SRC / "cacheaug").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(
            ast.parse(path.read_text())
        ):  # every import: module level, inside functions, TYPE_CHECKING
            if isinstance(node, ast.ImportFrom) and node.level:
                target = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                deps |= {".".join(target + [a.name]) for a in node.names} if node.module is None else {".".join(target)}
        graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != "cacheaug"} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node, stack):
        for dep in sorted(graph[node]):
            if dep in stack:
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    return found


def test_no_import_circle():
    graph = _module_graph()
    assert "cacheaug.arms" in graph and graph["cacheaug.model"] >= {"cacheaug.arms", "cacheaug.config"}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the check itself works


def test_the_arm_registry_imports_no_implementation():
    graph = _module_graph()
    assert graph["cacheaug.arms"] == set()
    assert {"cacheaug.arms"} <= graph["cacheaug.coprocessor"] and {"cacheaug.arms"} <= graph["cacheaug.controls"]
    assert "cacheaug.serving.engine" not in graph["cacheaug.serving.policies"]  # policies see an interface
