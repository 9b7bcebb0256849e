"""The layering of the package, read from the source with ast (lazy imports inside functions
included): no import circle between single modules nor between subpackages, `cprec.runtime` stands
on neither job, the evaluation job stands on `cprec.runtime`, never on `cprec.train`, and every
module imports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

CPREC = Path(__file__).resolve().parents[1] / "cprec"


def module_names(root: Path = CPREC) -> dict[str, Path]:
    """Dotted name -> file for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b`` (or the
    nearest package above it); ``import a.b.c`` as importing ``a.b.c``.
    """

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(nearest(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in modules else nearest(base))
        graph[name] = {d for d in deps if d is not None and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


MODULES = module_names()
GRAPH = import_graph(MODULES)


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_cprec_has_no_import_circle():
    assert "cprec.prepare.readers" in MODULES and "cprec.stream.loader" in MODULES
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_a_circle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "cprec"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from cprec.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("import cprec.sub.a\n")
    graph = import_graph(module_names(pkg))
    assert graph["cprec.c"] == {"cprec.sub.a"}
    assert find_cycle(graph) == ["cprec.sub.a", "cprec.sub.b", "cprec.sub.a"]


def test_no_circle_between_subpackages():
    """Layers: config -> model/data -> runtime -> train | eval (top-level modules are nodes too)."""
    edges: dict[str, set[str]] = {}
    for m, deps in GRAPH.items():
        for n in deps:
            if n != "cprec" and _package(n) != _package(m):
                edges.setdefault(_package(m), set()).add(_package(n))
    cycle = find_cycle(edges)
    assert cycle is None, "subpackage circle: " + " -> ".join(cycle)


def test_eval_does_not_stand_on_train():
    bad = {m: sorted(n for n in deps if n.startswith("cprec.train")) for m, deps in GRAPH.items()}
    assert not {m: d for m, d in bad.items() if m.startswith("cprec.eval") and d}


def test_runtime_stands_on_neither_job():
    for m, deps in GRAPH.items():
        if m.startswith("cprec.runtime"):
            assert not {n for n in deps if n.startswith(("cprec.train", "cprec.eval"))}, m


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)
