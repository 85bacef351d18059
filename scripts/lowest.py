"""Constraints that pin every direct runtime dependency to the floor its pyproject declares.

pip has no "lowest" resolution, so scripts/lowest-test installs the requirements of
pyproject.toml and of the Python client (clients/python) with this file as constraints:
the direct dependencies at exactly their declared lower bounds (their own dependencies and
the dev tools resolve as usual), then runs the unit tests there. A floor the code has
outgrown then fails in CI instead of on a user's machine.

    python scripts/lowest.py            # prints the constraints, one `name==floor` a line

Every direct dependency must declare a `>=` floor: one without is an error here.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name, optional [extras], then a specifier list; a marker after `;` is kept out of it.
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)")
_FLOOR = re.compile(r">=\s*([0-9][0-9A-Za-z.+!-]*)")


def floors(requirements: list[str]) -> dict[str, str]:
    """`{name: floor}` for each requirement; ValueError names any without a `>=` floor."""
    out: dict[str, str] = {}
    missing = []
    for req in requirements:
        match = _REQUIREMENT.match(req)
        if match is None:
            raise ValueError(f"cannot read requirement {req!r}")
        name, _extras, spec = match.groups()
        floor = _FLOOR.search(spec)
        if floor is None:
            missing.append(req)
            continue
        out[name.lower().replace("_", "-")] = floor.group(1)
    if missing:
        raise ValueError(f"no >= floor: {', '.join(missing)}")
    return out


PROJECTS = (ROOT / "pyproject.toml", ROOT / "clients/python/pyproject.toml")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def project_floors(pyprojects: tuple[Path, ...] = PROJECTS) -> dict[str, str]:
    """The floors of the server's and the Python client's dependencies: the tests run
    both in one venv, so a package both declare is held at the higher of its floors."""
    out: dict[str, str] = {}
    for pyproject in pyprojects:
        data = tomllib.loads(pyproject.read_text())
        deps: list[str] = data["project"]["dependencies"]
        for name, floor in floors(deps).items():
            if name not in out or _key(floor) > _key(out[name]):
                out[name] = floor
    return out


def main() -> int:
    try:
        pins = project_floors()
    except ValueError as exc:
        print(f"lowest: {exc}", file=sys.stderr)
        return 2
    for name, floor in pins.items():
        print(f"{name}=={floor}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
