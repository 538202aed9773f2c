"""handlers -> watchout <- workers: only watchout.cli (the composition root) may import handlers or workers,
only store.py may import the MongoDB drivers, and only the SDK itself (client.py, client_roles.py, simulators.py)
and the composition root import the SDK."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "watchout").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_neither_handlers_nor_workers(path):
    if path.name == "cli.py":
        return
    assert not _imports(path) & {"handlers", "workers"}


SDK_FILES = {"client.py", "client_roles.py", "simulators.py"}
SDK_MODULES = {f"watchout.{name.removesuffix('.py')}" for name in SDK_FILES}


def _modules(path: Path) -> set[str]:
    """Full names of the modules `path` imports; `from watchout import client` counts as watchout.client."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "watchout").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT / "watchout")))
def test_core_never_imports_the_sdk(path):
    # cli.py is the composition root: `watchout simulate` and `watchout demo` run the SDK's simulators
    if path.parent == ROOT / "watchout" and path.name in SDK_FILES | {"cli.py"}:
        return
    assert not _modules(path) & SDK_MODULES


PACKAGE_FILES = sorted(p for d in ("watchout", "handlers", "workers") for p in (ROOT / d).glob("*.py"))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_only_the_store_touches_the_mongodb_drivers(path):
    if path.name == "store.py":
        return
    assert not _imports(path) & {"motor", "mongomock", "mongomock_motor", "pymongo"}


def test_flake8_is_clean():
    result = subprocess.run([sys.executable, "-m", "flake8", "watchout", "handlers", "workers", "tests", "bench",
                             "docs/examples"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    result = subprocess.run([sys.executable, "-m", "mypy", "watchout", "handlers", "workers"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
