"""The package's layout holds (issue 13): no import circle, and no module imports from a lower row.

The rows are those of docs/concepts.md ("Where things live"), the core first. Imports under
``if TYPE_CHECKING:`` are annotations only and are not followed; imports inside functions
are (they run too). Package ``__init__`` files only hand names on and are not nodes.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    ["memkit/errors.py"],
    ["memkit/typing.py", "memkit/memo.py"],
    ["memkit/protocol.py", "memkit/layer_states.py", "memkit/state.py", "memkit/checks.py"],
    ["memkit/attention/"],
    ["memkit/memories/"],
    ["memkit/io.py", "memkit/atomic.py", "memkit/media.py"],
    ["memkit/layers/"],
    ["memkit/models/"],
    ["memkit/integrations/"],
    ["memkit/data/"],
    ["memkit/train/"],
    ["memkit/testing/"],
    ["memkit/cli.py", "memkit/demo.py", "memkit/tour.py"],
]


def _row(path: str) -> int | None:
    for i, row in enumerate(ROWS):
        if any(path == p or (p.endswith("/") and path.startswith(p)) for p in row):
            return i
    return None


def _target(module: str) -> str | None:
    p = ROOT / Path(*module.split("."))
    for candidate in (p.with_suffix(".py"), p / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(ROOT).as_posix()
    return None


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for file in sorted((ROOT / "memkit").rglob("*.py")):
        path = file.relative_to(ROOT).as_posix()
        if path.endswith("__init__.py"):
            continue
        edges = graph.setdefault(path, set())
        for node in _runtime_nodes(ast.parse(file.read_text())):
            modules: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memkit"):
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names if a.name.startswith("memkit")]
            for m in modules:
                target = _target(m)
                if target and not target.endswith("__init__.py") and target != path:
                    edges.add(target)
    return graph


def test_no_module_imports_from_a_lower_row() -> None:
    down = [
        f"{src} -> {dst}"
        for src, dsts in _graph().items()
        for dst in dsts
        if _row(src) is not None and _row(dst) is not None and _row(dst) > _row(src)  # type: ignore[operator]
    ]
    assert not down, "imports from a lower row of docs/concepts.md's map:\n" + "\n".join(sorted(down))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle() -> None:
    circles = _circles(_graph())
    assert not circles, f"import circles: {circles}"


def test_the_checks_can_fail() -> None:
    graph = _graph()
    assert "memkit/protocol.py" in graph["memkit/memories/sink_window.py"]  # edges are found
    assert _row("memkit/memories/sink_window.py") == 4 and _row("memkit/cli.py") == len(ROWS) - 1
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
