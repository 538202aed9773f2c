"""handlers -> watchout <- workers: only watchout.cli (the composition root) may import handlers or workers,
only store/mongo.py may import the MongoDB drivers, only protocol.py builds server messages, every error
either answers or closes, docs/architecture.md names every module, and only the SDK itself (client.py,
client_roles.py, simulators.py) and the composition root import the SDK."""
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


PACKAGE_FILES = sorted(p for d in ("watchout", "handlers", "workers") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_mongodb_store_touches_the_mongodb_drivers(path):
    if path == ROOT / "watchout" / "store" / "mongo.py":
        return
    assert not _imports(path) & {"motor", "mongomock", "mongomock_motor", "pymongo"}


def _message_literals(path: Path) -> list[int]:
    """Lines of `path` where a dict literal with a "type" key (a wire message) is written."""
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Dict)
            and any(isinstance(k, ast.Constant) and k.value == "type" for k in node.keys)]


# resources.py builds the notifications' payloads (webhooks, MQTT, Web Push), which are not WebSocket messages
SERVER_FILES = [p for p in PACKAGE_FILES if p.name not in SDK_FILES | {"protocol.py", "resources.py"}]


@pytest.mark.parametrize("path", SERVER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_protocol_builds_server_messages(path):
    """Every message the server sends comes from a constructor in watchout/protocol.py (the video frame's
    bytes from watchout/frames.py, which writes no dict)."""
    assert _message_literals(path) == []


def test_the_message_check_finds_a_message_literal(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('peer.send({"type": "pong"})\n')
    assert _message_literals(probe) == [1]


def test_every_error_either_answers_or_closes():
    from watchout import errors

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    kinds = (errors.ReplyError, errors.Disconnect)
    found = [c for c in subclasses(errors.WatchoutError) if c not in kinds]
    assert found and all(issubclass(c, kinds) for c in found), [c.__name__ for c in found]
    assert all(isinstance(c.close_code, errors.CloseCode) for c in subclasses(errors.Disconnect))


def test_the_architecture_page_names_every_module_and_only_modules_that_exist():
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", page))
    core = {p.relative_to(ROOT / "watchout").as_posix() for p in (ROOT / "watchout").rglob("*.py")}
    bases = (ROOT, ROOT / "watchout", ROOT / "watchout" / "store")
    exists = {n for n in named if any((base / n).exists() for base in bases)}
    assert named == exists, f"named but missing: {sorted(named - exists)}"
    short = {n.removeprefix("watchout/") for n in named}
    packaging = {"__init__.py", "__main__.py", "store/__init__.py"}
    unnamed = {m for m in core if not {m, m.rsplit("/", 1)[-1]} & short and m not in packaging}
    assert not unnamed, f"core modules the page does not name: {sorted(unnamed)}"


def test_flake8_is_clean():
    result = subprocess.run([sys.executable, "-m", "flake8", "watchout", "handlers", "workers", "tests", "bench",
                             "docs/examples"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    result = subprocess.run([sys.executable, "-m", "mypy", "watchout", "handlers", "workers"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
