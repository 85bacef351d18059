"""The OpenAPI document covers exactly the HTTP routes the gateway serves."""

from __future__ import annotations

import re

import pytest
import schemathesis
from starlette.routing import Mount, Route

from core.settings import Settings
from gateway.app import create_app
from gateway.http.openapi import document

# Served, but not part of the API: the demo app and its files.
NOT_API = {("GET", "/"), ("HEAD", "/")}


def _settings(dev: bool) -> Settings:
    return Settings.from_env(
        {"AGORA_JWT_SECRET": "x" * 32, "AGORA_DEV_TOKENS": "true" if dev else "false"}
    )


def served(dev: bool) -> set[tuple[str, str]]:
    app = create_app(_settings(dev))
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                out.add((method, route.path))
        else:
            assert isinstance(route, Mount) or route.path == "/v1/ws", route
    return out - NOT_API - {("HEAD", p) for _, p in out}


def documented(dev: bool) -> set[tuple[str, str]]:
    doc = document(_settings(dev))
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}


@pytest.mark.parametrize("dev", [False, True], ids=["dev-tokens-off", "dev-tokens-on"])
def test_every_route_is_documented_and_nothing_else(dev: bool) -> None:
    assert served(dev) == documented(dev)


def test_document_loads_and_names_only_protocol_error_statuses() -> None:
    doc = document(_settings(True))
    schema = schemathesis.openapi.from_dict(doc)
    assert len(list(schema.get_all_operations())) == len(documented(True))
    allowed = {"200", "201", "202", "204", "400", "401", "403", "404", "409", "413", "422"}
    allowed |= {"429", "503"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert set(op["responses"]) <= allowed, (method, path)
            assert re.fullmatch(r"[a-z][A-Za-z]+", op["operationId"])
            for status in ("429", "503"):
                if status in op["responses"] and path != "/readyz":
                    assert "Retry-After" in op["responses"][status]["headers"]
