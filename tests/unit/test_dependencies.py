"""Declared dependencies hold: every module imports (scripts/lowest-test runs this with each
direct dependency at its floor), every third-party import is declared, every declared
dependency has a floor, and requirements.lock pins them all within their ranges."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from scripts.lowest import floors, project_floors

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "storage", "fanout", "gateway", "devstack", "agora_client")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def module_names(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports(package: str) -> None:
    # Import errors at a floor (an API that version lacks) show up here, not in production.
    for name in module_names(package):
        importlib.import_module(name)


def third_party_imports(package: str) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in PACKAGES and top != "__future__":
                    found.add(top)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {normalise(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def distributions_of(modules: set[str]) -> set[str]:
    dists = importlib.metadata.packages_distributions()
    out = set()
    for module in modules:
        assert module in dists, f"{module} is imported but no installed distribution has it"
        out.update(normalise(d) for d in dists[module])
    return out


def test_every_server_import_is_a_declared_dependency() -> None:
    imported: set[str] = set()
    for package in ("core", "storage", "fanout", "gateway", "devstack"):
        imported |= third_party_imports(package)
    missing = distributions_of(imported) - declared(PYPROJECT["project"]["dependencies"])
    assert missing == set(), f"imported but not declared in pyproject.toml: {missing}"


def test_the_client_imports_only_its_own_dependencies() -> None:
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())
    allowed = declared(client["project"]["dependencies"])
    assert allowed == {"websockets", "orjson", "msgpack"}
    assert distributions_of(third_party_imports("agora_client")) <= allowed


def test_every_dependency_has_a_floor() -> None:
    pins = project_floors()
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())
    both = PYPROJECT["project"]["dependencies"] + client["project"]["dependencies"]
    assert set(pins) == declared(both)


def test_a_floor_both_projects_declare_is_the_higher(tmp_path: Path) -> None:
    # One venv runs the server's and the client's tests.
    server, client = tmp_path / "server.toml", tmp_path / "client.toml"
    server.write_text('[project]\ndependencies = ["websockets>=13.0", "orjson>=3.10"]\n')
    client.write_text('[project]\ndependencies = ["websockets>=14.1", "orjson>=3.9"]\n')
    assert project_floors((server, client)) == {"websockets": "14.1", "orjson": "3.10"}
    with pytest.raises(ValueError, match="no >= floor"):
        floors(["starlette", "orjson>=3.9"])
    assert floors(["uvicorn[standard]>=0.45", "redis[hiredis] >= 5.0.1"]) == {
        "uvicorn": "0.45",
        "redis": "5.0.1",
    }


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_the_lock_pins_every_dependency_within_its_range() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pins = {
        normalise(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", lock, re.M)
    }
    for name, floor in project_floors().items():
        assert name in pins, f"{name} is not in requirements.lock: run scripts/lock"
        assert version_tuple(pins[name]) >= version_tuple(floor), (name, pins[name], floor)


def test_the_transport_finds_what_it_needs_in_uvicorn() -> None:
    # gateway.transport subclasses uvicorn's httptools protocol and reuses its trusted
    # proxy parser; these are the pieces the pinned floor (0.45) is for.
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.transport import _trusted_hosts

    trusted = _trusted_hosts(("127.0.0.1",))
    assert "127.0.0.1" in trusted
    assert trusted.get_trusted_client_address("203.0.113.9:4321, 127.0.0.1") == (
        "203.0.113.9",
        4321,
    )
    for name in ("_should_upgrade", "_unsupported_upgrade_warning", "send_400_response"):
        assert callable(getattr(HttpToolsProtocol, name)), name
