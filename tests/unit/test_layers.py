"""Imports flow gateway -> fanout -> storage; the protocol core never touches asyncio."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"storage": 0, "fanout": 1, "gateway": 2}


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
    for package in [*LAYERS, "agora_client"]:
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


def test_protocol_core_is_sans_io() -> None:
    forbidden = {"asyncio", "socket", "starlette", "websockets", "redis", "asyncpg", "aiokafka"}
    # websockets.speedups is one C function (XOR with the frame mask): computation, no I/O.
    allowed = {"websockets.speedups"}
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
            if ("os.environ" in text or "os.getenv" in text) and path.name not in (
                "settings.py",
                "services.py",  # passes the environment through to apt-get
            ):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
