"""The package's imports flow one way (docs/architecture.md, "Layers"): a module imports only from its own layer or
the layers below it, at module level, and no two modules import each other (directly or round a cycle)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "neurospec"

# Lower number = lower layer. A module may import from a layer with a number <= its own; no cycle anywhere.
LAYERS = {
    "errors": 0,
    "runtime": 0,
    "allocator": 0,
    "models": 1,
    "data": 1,
    "record": 2,
    "evaluate": 3,
    "intervene": 3,
    "score": 3,
    "sparsity": 4,
    "cluster": 4,
    "skills": 4,
    "analyze": 5,
    "report": 6,
    "experiments": 7,
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}

# Imports of project modules inside a function, allowed with their reason. Keys: (importing module, imported module).
FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {}

# Packages whose imports are not checked for function-level imports, with the reason.
FUNCTION_LEVEL_EXEMPT_PACKAGES = {
    # The command line imports each command's implementation inside the command, so that `neurospec --help` and the
    # option checks that run before a model loads do not import torch and transformers.
    "neurospec.cli": "start-up time of the command line",
}


def _module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import of a neurospec module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute module name")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neurospec"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out.extend((n, node.lineno, id(node) in top) for n in names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("neurospec"))
    return out


def _graph(package: Path = PACKAGE) -> dict[str, set[tuple[str, int, bool]]]:
    """``{module: {(imported module, line, at module level)}}``; ``neurospec`` itself (the package's
    ``__version__``) is not an edge."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        deps = set()
        for target, line, top in _imports(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and target != "neurospec":
                deps.add((target, line, top))
        edges[name] = deps
    return edges


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[key]


def _upward(edges) -> list[str]:
    return sorted(f"{m} imports {t} (line {line})" for m, deps in edges.items() for t, line, _ in deps
                  if _layer(t) > _layer(m))


def _function_level(edges) -> list[str]:
    return sorted(f"{m} imports {t} inside a function (line {line})" for m, deps in edges.items()
                  for t, line, top in deps
                  if not top and (m, t) not in FUNCTION_LEVEL_ALLOWED
                  and not any(m == p or m.startswith(p + ".") for p in FUNCTION_LEVEL_EXEMPT_PACKAGES))


def _cycles(edges) -> list[str]:
    graph = {m: {t for t, _, _ in deps} for m, deps in edges.items()}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_every_module_has_a_layer():
    missing = [name for name in _graph() if (name.split(".") + ["__init__"])[1] not in LAYERS]
    assert not missing, f"modules outside every layer (add their folder to LAYERS): {missing}"


def test_no_upward_import():
    bad = _upward(_graph())
    assert not bad, "\n".join(bad)


def test_project_modules_are_imported_at_module_level():
    """Lazy imports are for heavy third-party libraries only; between project modules they hide cycles."""
    bad = _function_level(_graph())
    assert not bad, "\n".join(bad)


def test_no_cycle():
    bad = _cycles(_graph())
    assert not bad, "\n".join(bad)


def test_the_checks_find_planted_violations(tmp_path):
    """The checks are not vacuous: an upward, a function-level and a cyclic import planted in a copy are found."""
    root = tmp_path / "neurospec"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "models" / "bad.py").write_text("from neurospec.report import html\n\n\ndef f():\n"
                                            "    from neurospec.data import tasks\n")
    (root / "data" / "loop_a.py").write_text("from neurospec.data import loop_b\n")
    (root / "data" / "loop_b.py").write_text("from neurospec.data import loop_a\n")
    edges = _graph(root)
    assert "neurospec.models.bad imports neurospec.report.html (line 1)" in _upward(edges)
    assert "neurospec.models.bad imports neurospec.data.tasks inside a function (line 5)" in _function_level(edges)
    assert "neurospec.data.loop_a -> neurospec.data.loop_b -> neurospec.data.loop_a" in _cycles(edges)
