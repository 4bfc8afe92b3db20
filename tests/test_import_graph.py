"""The product code's imports run one way (docs/architecture.md, "The shape"): no module of
``models``, ``workers``, ``schedules``, ``api``, ``rotator`` or ``receiver`` reaches itself again
through its imports, counting imports made inside functions (a circle hidden in a function is
still a circle) and leaving out only ``TYPE_CHECKING`` blocks and the packages' own
``__init__`` re-exports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "workers", "schedules", "api", "rotator", "receiver")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(tree: ast.AST, modules: dict[str, Path]) -> Iterator[str]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    yield full
                elif node.module in modules and node.module not in PACKAGES:
                    yield node.module
        yield from _imports(node, modules)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: set(_imports(ast.parse(path.read_text()), modules))
        for name, path in modules.items()
        if path.name != "__init__.py"
    }


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in graph.get(name, ()):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return circles


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    assert "models.migration" in graph["models.remote"]  # the walk sees real imports
    assert _circles(graph) == []


def test_the_check_finds_a_circle_hidden_in_a_function() -> None:
    graph = {"models.a": {"models.b"}, "models.b": {"models.c"}, "models.c": {"models.a"}}
    assert _circles(graph) == [["models.a", "models.b", "models.c"]]
    inner = ast.parse("def f():\n    from models import endpoint\n")
    assert list(_imports(inner, {"models.endpoint": Path()})) == ["models.endpoint"]
    typing_only = ast.parse("if TYPE_CHECKING:\n    from models import endpoint\n")
    assert list(_imports(typing_only, {"models.endpoint": Path()})) == []
