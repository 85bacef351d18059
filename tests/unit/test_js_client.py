"""The browser client package (gateway/static) under Node: `tsc --noEmit` on its type
declarations and node's test runner on its reconnect rules and MessagePack codec
(clients/js). Skipped, saying why, where Node.js or the npm packages are missing
(scripts/bootstrap installs them when npm exists)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "clients/js"
NODE = shutil.which("node")


def need(path: str) -> None:
    if NODE is None:
        pytest.skip("node is not installed")
    if not (JS / "node_modules" / path).exists():
        pytest.skip(f"clients/js/node_modules/{path} missing: run scripts/bootstrap (needs npm)")


def node_test(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run node's test runner; (tests passed, output). Fails on any failure."""
    assert NODE is not None
    out = subprocess.run(
        [NODE, *args], cwd=JS, capture_output=True, text=True, timeout=240, env=env
    )
    text = out.stdout + out.stderr
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped) (\d+)$", text, re.M)}
    assert out.returncode == 0 and counts.get("fail") == 0, text[-4000:]
    return counts["pass"], text


def test_type_declarations_compile() -> None:
    need("typescript/bin/tsc")
    need("agora-client/package.json")
    assert NODE is not None
    out = subprocess.run(
        [NODE, "node_modules/typescript/bin/tsc", "--noEmit", "-p", "tsconfig.json"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_node_unit_tests() -> None:
    need("agora-client/package.json")
    passed, _ = node_test("--test", "test/")
    assert passed >= 18
