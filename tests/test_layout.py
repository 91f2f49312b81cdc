"""The dependency rule: protos <- pipeline <- {edge_node, cloud_node} <- edgepipe, checked on the sources."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What each package may not import (top-level module names).
FORBIDDEN = {
    "pipeline": {"edgepipe", "edge_node", "cloud_node", "rich", "matplotlib", "argparse", "subprocess"},
    "edge_node": {"edgepipe", "cloud_node", "rich", "matplotlib", "argparse", "subprocess"},
    "cloud_node": {"edgepipe", "edge_node", "rich", "matplotlib", "argparse", "subprocess"},
    "protos": {"edgepipe", "edge_node", "cloud_node", "pipeline"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _prints(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
        for node in ast.walk(tree)
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_the_dependency_rule_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no sources"
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in files
        if _imports(path) & FORBIDDEN[package]
    }
    assert not wrong, f"{package} imports what it must not: {wrong}"


@pytest.mark.parametrize("package", ["pipeline", "edge_node", "cloud_node"])
def test_the_library_and_the_nodes_never_print(package: str) -> None:
    loud = [str(path.relative_to(ROOT)) for path in sorted((ROOT / package).rglob("*.py")) if _prints(path)]
    assert not loud, f"these modules print; return values or raise instead: {loud}"


def test_every_module_says_its_job_in_a_docstring() -> None:
    missing = []
    for package in ("pipeline", "edge_node", "cloud_node", "edgepipe"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules without a one-line docstring: {missing}"
