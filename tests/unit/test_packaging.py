"""Packaging: one version, the license, the changelog, py.typed, and the Python client as
its own distribution (`agora-client`) that needs nothing of the server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import agora_client
import gateway
from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CLIENT = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())


def test_one_version_source(capsys: pytest.CaptureFixture[str]) -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "gateway.__version__"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"agora {gateway.__version__}"


def test_the_changelog_names_the_version_first() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    first = next(line for line in text.splitlines() if line.startswith("## "))
    assert first.split()[1] == gateway.__version__


def test_license_is_the_declared_one() -> None:
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert CLIENT["project"]["license"] == "MIT"


@pytest.mark.parametrize(
    "package", ["core", "devstack", "gateway", "fanout", "storage", "agora_client"]
)
def test_every_package_is_typed(package: str) -> None:
    assert (ROOT / package / "py.typed").exists()
    project = PYPROJECT if package != "agora_client" else CLIENT
    assert "py.typed" in project["tool"]["setuptools"]["package-data"][package]


def test_the_client_ships_in_its_own_distribution_only() -> None:
    assert "agora_client*" not in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert CLIENT["project"]["name"] == "agora-client"
    assert CLIENT["tool"]["setuptools"]["packages"] == ["agora_client"]
    assert (ROOT / "clients/python/agora_client").resolve() == ROOT / "agora_client"


def test_the_client_distribution_builds_and_imports_alone(tmp_path: Path) -> None:
    # A copy with the symlinked package resolved: the build leaves nothing in the tree.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "clients/python", src, symlinks=False)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(wheels)],
        check=True,
        timeout=240,
    )
    (wheel,) = wheels.glob("agora_client-*.whl")
    assert wheel.name.startswith(f"agora_client-{agora_client.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith("dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names if not n.startswith("agora_client-")} == {"agora_client"}
    assert "agora_client/py.typed" in names
    requires = sorted(
        line.split(":", 1)[1].strip().split(">=")[0]
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    )
    assert requires == ["msgpack", "orjson", "websockets"]
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=120,
    )
    # From a directory outside the repository, with the installed copy first on the path:
    # it must import whole and load nothing of the server.
    probe = (
        "import sys, agora_client, agora_client.resilient; "
        "assert agora_client.__file__.startswith(sys.argv[1]), agora_client.__file__; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('gateway', 'fanout', 'storage', 'starlette', 'uvicorn', 'asyncpg', 'redis', "
        "'aiokafka')); "
        "assert not bad, bad; print(agora_client.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(target)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == agora_client.__version__
