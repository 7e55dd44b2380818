"""The shape the code must keep (DEVELOPERS.md): no import cycle inside dcapd, no import done
inside a function to dodge one, and small modules (the pure selection and integrity modules
excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dcapd"
LONG_MODULES_ALLOWED = {"selection", "integrity"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, known: set[str], tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """dcapd modules ``module`` imports, each with its import node."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for name in candidates:
            if name in known and name != module:
                out.append((name, node))
    return out


def _parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: {target for target, _ in _imported(name, path, known, _parse(path))}
        for name, path in modules.items()
    }


def test_the_import_graph_of_dcapd_has_no_cycle():
    graph = _graph()
    # A module's package __init__ runs first; edges into a package's own __init__ from
    # its modules are not cycles of the code's design.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if node.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_dcapd_module_is_imported_inside_a_function():
    modules = _modules()
    known = set(modules)
    late = []
    for name, path in modules.items():
        tree = _parse(path)
        imports = {id(node) for _, node in _imported(name, path, known, tree)}
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if id(node) in imports:
                    late.append(f"{path.name}:{node.lineno}")
    assert late == []


def test_modules_stay_small():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
        and name.rpartition(".")[2] not in LONG_MODULES_ALLOWED
    }
    assert long == {}
