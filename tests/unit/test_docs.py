"""The documentation stands alone: every relative link in the Markdown files points at a
file of the repository, and no file refers to anything outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def _markdown() -> list[Path]:
    return [p for p in _tracked() if p.suffix == ".md" and p.exists()]


def test_the_contract_and_the_design_are_in_the_repo() -> None:
    for name in ("protocol.md", "architecture.md", "operations.md", "clients.md"):
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize("path", _markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same file
        file = target.split("#", 1)[0]
        resolved = (path.parent / file).resolve()
        if not resolved.exists() or not resolved.is_relative_to(ROOT):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to {broken}"


def test_nothing_refers_outside_the_repository() -> None:
    offenders = []
    for path in _tracked():
        if not path.is_file() or path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if "../shared" in text or "PROTOCOL.md" in text or "DESIGN.md" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these files refer to documents outside the repository: {offenders}"
