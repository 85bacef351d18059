"""Constraints that pin every direct runtime dependency to the floor pyproject.toml declares.

pip has no "lowest" resolution, so scripts/lowest-test installs `.[dev]` with this file as
constraints: the direct dependencies at exactly their declared lower bounds (their own
dependencies and the dev tools resolve as usual), then runs the unit tests there. A floor
the code has outgrown then fails in CI instead of on a user's machine.

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


def project_floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    data = tomllib.loads(pyproject.read_text())
    deps: list[str] = data["project"]["dependencies"]
    return floors(deps)


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
