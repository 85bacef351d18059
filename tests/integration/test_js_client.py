"""The browser client (gateway/static/agora.js) under Node against a real gateway and
fan-out worker: JSON and MessagePack clients in one conversation, a dropped connection
resumed without gap or duplicate, the HTTP helper and `/healthz`'s version
(clients/js/live/gateway.test.mjs)."""

from __future__ import annotations

import asyncio
import os
import shutil

import httpx
import pytest

from core.settings import Settings
from gateway import __version__
from tests.integration.helpers import create_group, uid
from tests.stack import Stack
from tests.unit.test_js_client import JS, need, node_test

pytestmark = pytest.mark.engines


async def test_js_client_against_a_gateway(settings: Settings, http: httpx.AsyncClient) -> None:
    need("agora-client/package.json")
    flag = await _websocket_flag()
    s = Stack(settings)
    try:
        g = s.gateway("js-g1")
        s.fanout("js-f1")
        a, b = uid("jsa"), uid("jsb")
        conv = await create_group(http, s, g, a, [b])
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "AGORA_LIVE_WS": g.ws_url,
            "AGORA_LIVE_TOKEN_A": s.token(a),
            "AGORA_LIVE_TOKEN_B": s.token(b),
            "AGORA_LIVE_CONV": conv,
            "AGORA_LIVE_HTTP": g.http_url,
            "AGORA_LIVE_VERSION": __version__,
        }
        passed, out = await asyncio.to_thread(
            node_test, *flag, "--test", "live/gateway.test.mjs", env=env
        )
        assert passed == 2 and "# skipped 0" in out, out[-3000:]
    finally:
        await asyncio.to_thread(s.stop_all)


async def _websocket_flag() -> list[str]:
    """Node 22 has a WebSocket; Node 20.10+ behind a flag; older ones none (skip)."""
    node = shutil.which("node")
    assert node is not None
    for flag in ([], ["--experimental-websocket"]):
        proc = await asyncio.create_subprocess_exec(
            node,
            *flag,
            "-e",
            "process.exit(globalThis.WebSocket ? 0 : 1)",
            cwd=JS,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if await proc.wait() == 0:
            return flag
    pytest.skip("this node has no WebSocket (Node >= 20.10 needed)")
