"""The layering of the package, read from the source with ast (lazy imports inside functions
included): no circle between subpackages, `cprec.runtime` stands on neither job, and the evaluation
job stands on `cprec.runtime`, never on `cprec.train`. (Circles between single modules:
tests/test_imports.py.)"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cprec"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The cprec module an import of ``name`` loads (a package's __init__, or the module itself)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """cprec modules imported anywhere in ``module`` (top level and inside functions alike)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        found |= {t for n in names if n.startswith("cprec") and (t := _target(n)) and t != module}
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_circle_between_subpackages():
    """Layers: config -> model/data -> runtime -> train | eval (top-level modules are nodes too)."""
    edges = {}
    for m, deps in GRAPH.items():
        for n in deps:
            if n != "cprec" and _package(n) != _package(m):
                edges.setdefault(_package(m), set()).add(_package(n))
    done: set[str] = set()

    def reach(a: str, seen: tuple[str, ...]) -> None:
        assert a not in seen, "subpackage circle: " + " -> ".join((*seen, a))
        if a in done:
            return
        for b in sorted(edges.get(a, ())):
            reach(b, (*seen, a))
        done.add(a)

    for a in sorted(edges):
        reach(a, ())


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
