"""The apps depend on each other in one direction only (STYLE.md rule 13).

``pushsite`` (settings, server) <- ``connections`` (the transport) <-
``notifications`` (the domain). Only the composition roots, the ASGI
application and the URL configuration, put the two apps together. Imports are
read from the source, so an import inside a function counts as much as one at
the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pushsite", "connections", "notifications")
# Where the apps are put together; everything else in pushsite is below both apps.
COMPOSITION_ROOTS = {"pushsite.asgi", "pushsite.urls"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules it imports; ``from pkg import name`` naming a module counts as that module."""
    files = {module_name(root, path): path for package in packages for path in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                named = {f"{source}.{alias.name}" for alias in node.names} & files.keys()
                targets.update(named or {source})
        graph[module] = {t for t in targets if t in files and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go against pushsite <- connections <- notifications."""
    rank = {"pushsite": 0, "connections": 1, "notifications": 2}
    wrong = []
    for module, targets in graph.items():
        if module in COMPOSITION_ROOTS:
            continue
        for target in targets:
            if rank[target.split(".")[0]] > rank[module.split(".")[0]]:
                wrong.append(f"{module} imports {target}")
    return sorted(wrong)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT, PACKAGES)


def test_connections_imports_nothing_from_notifications(graph):
    assert not [
        f"{m} imports {t}"
        for m, ts in graph.items()
        if m.startswith("connections")
        for t in ts
        if t.startswith("notifications")
    ]


def test_no_app_imports_one_above_it(graph):
    assert upward_imports(graph) == []


def test_the_import_graph_has_no_cycles(graph):
    assert cycles(graph) == []


def test_the_graph_sees_the_imports_that_matter(graph):
    # The check is only as good as the graph it reads: a relative, a lazy and
    # an absolute import of the real tree are all in it.
    assert "connections.bridge" in graph["connections.consumers"]
    assert "connections.inbox" in graph["notifications.apps"]
    assert "notifications.views" in graph["pushsite.asgi"]


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    for package, files in {
        "connections": {"__init__.py": "", "a.py": "from . import b\n", "b.py": "def f():\n    from .a import x\n"},
        "notifications": {"__init__.py": "", "c.py": "import connections.a\n"},
        "pushsite": {"__init__.py": ""},
    }.items():
        (tmp_path / package).mkdir()
        for name, text in files.items():
            (tmp_path / package / name).write_text(text)
    (tmp_path / "connections" / "d.py").write_text("from notifications.c import y\n")
    planted = import_graph(tmp_path, PACKAGES)
    assert cycles(planted) == [["connections.a", "connections.b"]]
    assert upward_imports(planted) == ["connections.d imports notifications.c"]
