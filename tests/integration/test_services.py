"""`agora services up|down|status` and `agora migrate`, as a newcomer runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from devstack.services import port_open
from tests.engines import free_port, settings_env

pytestmark = pytest.mark.engines


def agora(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_up_is_idempotent_and_down_stops_only_what_up_started(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    dsns = tuple(d + "_svc" for d in settings.shard_dsns)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update(settings_env(settings))
    env["AGORA_SHARD_DSNS"] = ",".join(dsns)
    env["AGORA_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{port}"
    state = str(tmp_path / "state")
    try:
        first = agora(env, "services", "up", "--state-dir", state)
        print(first)
        assert "postgres: reusing" in first and "redis: reusing" in first
        assert "kafka: started tansu pid" in first and f"127.0.0.1:{port}" in first
        assert first.count("created database") == 2
        assert "migrations on" in first and "kafka topics created" in first
        assert port_open("127.0.0.1", port)

        again = agora(env, "services", "up", "--state-dir", state)
        assert f"kafka: reusing 127.0.0.1:{port}" in again
        assert "created database" not in again and "up to date" in again

        status = agora(env, "services", "status", "--state-dir", state)
        assert "(tansu started by agora)" in status and "DOWN" not in status

        assert "up to date" in agora(env, "migrate")

        down = agora(env, "services", "down", "--state-dir", state)
        assert "kafka (tansu): stopped" in down
        assert "redis" not in down and "postgres" not in down  # reused, so left running
        assert not port_open("127.0.0.1", port)
        assert port_open("127.0.0.1", 5432) and port_open("127.0.0.1", 6379)
        assert "nothing to stop" in agora(env, "services", "down", "--state-dir", state)
    finally:
        import asyncio

        from devstack.services import drop_databases

        asyncio.run(drop_databases(dsns))


async def test_gateway_workers_are_separate_nodes_on_one_port(settings: Settings) -> None:

    from agora_client import AgoraClient
    from tests.stack import Stack, wait_http

    s = Stack(settings)
    port = free_port()
    proc = s._spawn("workers", ["gateway", "--port", str(port), "--workers", "2"], port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, 30)
        # Both workers listen once started; new connections spread over them.
        import time

        import httpx

        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            async with httpx.AsyncClient() as h:  # a new connection each time
                seen.add((await h.get(f"http://127.0.0.1:{port}/healthz")).json()["node"])
        assert len(seen) == 2
        nodes = set()
        clients = []
        for i in range(24):
            c = await AgoraClient.connect(proc.ws_url, s.token(f"w{i}"))
            nodes.add(c.hello["node"])
            clients.append(c)
        print(f"24 connections landed on nodes {sorted(nodes)}")
        assert len(nodes) == 2  # SO_REUSEPORT spreads connections over both processes
        proc.terminate()
        for c in clients:
            frame = await c.next_event("reconnect", timeout=10)
            assert frame["after_ms"] >= 0
        assert proc.popen.wait(30) == 0
    finally:
        s.stop_all()
