"""A worker's metrics listen on AGORA_METRICS_HOST only (loopback unless configured)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Iterator

import pytest

from core import logs
from core.settings import Settings
from fanout import metrics as fanout_metrics
from fanout.metrics import run_with_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(autouse=True)
def restore_process_globals() -> Iterator[None]:
    # run_with_metrics installs consumer metrics and log fields for the whole process.
    installed, fields = fanout_metrics._installed, dict(logs._process)
    yield
    fanout_metrics._installed = installed
    logs._process.clear()
    logs._process.update(fields)


async def healthz(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def reached_from(host: str, other: str, env: dict[str, str]) -> None:
    port = free_port()
    settings = Settings.from_env({"AGORA_METRICS_PORT": str(port), **env})

    async def main(_: Settings) -> None:
        assert re.match(rb"HTTP/1\.[01] 200 ", await healthz(host, port))
        with pytest.raises(OSError):  # connection refused: nothing listens there
            await healthz(other, port)

    await run_with_metrics(settings, "fanout", 0, main)


async def test_loopback_by_default() -> None:
    # 127.0.0.2 is loopback too on Linux, but a socket bound to 127.0.0.1 does not answer it.
    await reached_from("127.0.0.1", "127.0.0.2", {})


async def test_the_configured_address() -> None:
    await reached_from("127.0.0.2", "127.0.0.1", {"AGORA_METRICS_HOST": "127.0.0.2"})
