"""Every third-party module the code imports is a *direct* declared dependency.

An import covered only through another package's requirements breaks the day
that package drops it (lightkube 0.x used ``httpx``, 1.x uses ``httpx2``), so
each import must map, via ``importlib.metadata.packages_distributions()``, to a
distribution named in ``pyproject.toml`` itself.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import shipper

ROOT = Path(__file__).resolve().parents[2]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"unparsable requirement {req!r}"
    return _norm(m.group(1))


def declared(*extras: str) -> set[str]:
    """Normalised names of the runtime dependencies (plus the given extras) in pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {_req_name(r) for r in reqs}


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imported_top_levels(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(top-level module, line) of every absolute import executed at run time, including
    imports inside functions; ``if TYPE_CHECKING:`` blocks are skipped."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.partition(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.partition(".")[0], node.lineno
        stack.extend(ast.iter_child_nodes(node))


def uncovered(files: Iterable[Path], allowed: set[str], own: set[str]) -> list[str]:
    """Imports in ``files`` not provided by a distribution in ``allowed`` (one line each)."""
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in files:
        for top, line in imported_top_levels(ast.parse(path.read_text(), str(path))):
            if top in sys.stdlib_module_names or top in own:
                continue
            dists = {_norm(d) for d in providers.get(top, [])}
            if not dists & allowed:
                have = ", ".join(sorted(dists)) or "no installed distribution"
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                problems.append(f"{shown}:{line}: import {top} "
                                f"(provided by {have}) is not a declared direct dependency")
    return problems


def runtime_modules() -> list[str]:
    """Every module of the ``shipper`` package (all of it ships and may run), except
    ``__main__``, which runs the CLI when imported (its imports are still checked)."""
    return sorted(m.name for m in pkgutil.walk_packages(shipper.__path__, "shipper.")
                  if not m.name.endswith(".__main__"))


class TestDeclaredDependencies:
    @pytest.mark.parametrize("module", runtime_modules())
    def test_every_runtime_module_imports(self, module: str) -> None:
        """Each shipped module imports with the installed dependencies."""
        importlib.import_module(module)

    def test_runtime_imports_are_direct_dependencies(self) -> None:
        """Every third-party import in shipper/ maps to a [project] dependency."""
        files = sorted((ROOT / "shipper").rglob("*.py"))
        assert uncovered(files, declared(), {"shipper"}) == []

    def test_test_imports_are_declared_with_the_test_extra(self) -> None:
        """Every third-party import in tests/ and scripts/ maps to a dependency or the test
        extra."""
        files = sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])
        assert uncovered(files, declared("test"), {"shipper", "tests"}) == []

    def test_a_transitive_only_import_is_reported(self, tmp_path: Path) -> None:
        """The check fails on an import available only through another dependency's
        requirements (h2 comes with httpx2, but nobody declares it)."""
        mod = tmp_path / "m.py"
        mod.write_text("import os\nimport orjson\n\ndef f():\n    from h2 import config\n")
        problems = uncovered([mod], {"orjson"}, set())
        assert len(problems) == 1
        assert "m.py:5: import h2 (provided by h2) is not a declared direct" in problems[0]

    def test_type_checking_imports_are_not_runtime(self, tmp_path: Path) -> None:
        """Imports under ``if TYPE_CHECKING:`` are not counted as runtime imports."""
        mod = tmp_path / "m.py"
        mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import h2\n")
        assert uncovered([mod], set(), set()) == []
