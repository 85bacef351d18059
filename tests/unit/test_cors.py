"""CORS: off by default (no header for any origin), on for exactly AGORA_CORS_ORIGINS."""

from __future__ import annotations

import httpx

from core.settings import Settings
from gateway.app import create_app

APP_ORIGIN = "https://app.example"


def client(**env: str) -> httpx.AsyncClient:
    settings = Settings.from_env({"AGORA_JWT_SECRET": "x" * 32, **env})
    app = create_app(settings)
    app.state.settings = settings  # what the lifespan sets; /openapi.json reads it
    # Straight to the ASGI app: no lifespan, so no engines are needed.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def preflight(c: httpx.AsyncClient, origin: str) -> dict[str, str]:
    resp = await c.options(
        "/v1/me",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    return {k.lower(): v for k, v in resp.headers.items()} | {"status": str(resp.status_code)}


async def test_off_by_default() -> None:
    c = client()
    headers = await preflight(c, APP_ORIGIN)
    assert "access-control-allow-origin" not in headers
    resp = await c.get("/openapi.json", headers={"Origin": APP_ORIGIN})
    assert resp.status_code == 200
    assert "access-control-allow-origin" not in resp.headers


async def test_allowed_origin_gets_preflight_and_headers() -> None:
    c = client(AGORA_CORS_ORIGINS=f"{APP_ORIGIN},http://localhost:5173")
    headers = await preflight(c, APP_ORIGIN)
    assert headers["status"] == "200"
    assert headers["access-control-allow-origin"] == APP_ORIGIN
    assert "authorization" in headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in headers  # Bearer tokens, no cookies
    resp = await c.get("/openapi.json", headers={"Origin": APP_ORIGIN})
    assert resp.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "retry-after" in resp.headers["access-control-expose-headers"].lower()


async def test_other_origins_are_refused() -> None:
    c = client(AGORA_CORS_ORIGINS=APP_ORIGIN)
    headers = await preflight(c, "https://evil.example")
    assert headers["status"] == "400"
    assert "access-control-allow-origin" not in headers
    resp = await c.get("/openapi.json", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in resp.headers


async def test_any_origin() -> None:
    c = client(AGORA_CORS_ORIGINS="*")
    resp = await c.get("/asyncapi.json", headers={"Origin": "https://anyone.example"})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.json()["asyncapi"] == "3.0.0"
