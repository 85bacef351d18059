"""Imports flow gateway -> fanout -> storage -> core; no runtime module imports the dev
stack; the protocol core never touches asyncio."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# core: what every layer uses (settings, metrics, logs, errors); it imports none of them.
LAYERS = {"core": 0, "storage": 1, "fanout": 2, "gateway": 3}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_has_modules() -> None:
    for package in [*LAYERS, "agora_client", "devstack"]:
        assert modules(package), package


def test_no_upward_import() -> None:
    violations = []
    for package, level in LAYERS.items():
        for path in modules(package):
            for name in imports_of(path):
                top = name.split(".")[0]
                if top in LAYERS and LAYERS[top] > level:
                    violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def test_no_runtime_module_imports_the_dev_stack() -> None:
    # devstack starts engines for development and tests. `agora services` (gateway/cli.py)
    # imports it inside that command only, so no process that serves imports it.
    offenders = []
    for package in LAYERS:
        for path in modules(package):
            tree = ast.parse(path.read_text(), filename=str(path))
            nodes = tree.body if path.name == "cli.py" else list(ast.walk(tree))
            for node in nodes:
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n.split(".")[0] == "devstack" for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_protocol_core_is_sans_io() -> None:
    forbidden = {"asyncio", "socket", "starlette", "websockets", "redis", "asyncpg", "aiokafka"}
    # The websockets library's mask functions (XOR with the frame mask, in C in speedups, in
    # Python in utils): computation, no I/O.
    allowed = {"websockets.speedups", "websockets.utils"}
    for path in modules("gateway/protocol"):
        names = imports_of(path) - allowed
        bad = {n for n in names if n.split(".")[0] in forbidden}
        assert not bad, f"{path.name} imports {bad}"


def test_client_does_not_import_the_server() -> None:
    for path in modules("agora_client"):
        bad = {n for n in imports_of(path) if n.split(".")[0] in LAYERS}
        assert not bad, f"{path.name} imports {bad}"


def test_only_settings_reads_the_environment() -> None:
    offenders = []
    for package in LAYERS:
        for path in modules(package):
            text = path.read_text()
            if ("os.environ" in text or "os.getenv" in text) and path.name != "settings.py":
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
