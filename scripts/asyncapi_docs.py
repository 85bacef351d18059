"""Write docs/asyncapi.yaml from gateway.http.asyncapi (the document `GET /asyncapi.json`
serves). Run after changing a frame; tests/unit/test_asyncapi.py checks the copy:

    .venv/bin/python scripts/asyncapi_docs.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.http.asyncapi import document

ROOT = Path(__file__).resolve().parents[1]
PATH = ROOT / "docs" / "asyncapi.yaml"
HEADER = (
    "# The WebSocket protocol of docs/protocol.md as AsyncAPI 3.0, also served at\n"
    "# GET /asyncapi.json. Generated from gateway/http/asyncapi.py by\n"
    "# scripts/asyncapi_docs.py: edit that module, not this file.\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line descriptions as literal blocks, as a person would write them; no
    anchors/aliases for the schemas the document repeats."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(doc: dict[str, Any]) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=96)
    return HEADER + body


def main() -> None:
    PATH.write_text(render(document()), encoding="utf-8")
    print(f"wrote {PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
