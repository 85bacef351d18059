"""Shared steps of the end-to-end tests."""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx

from agora_client import AgoraClient
from tests.stack import Proc, Stack


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def create_group(
    http: httpx.AsyncClient, stack: Stack, node: Proc, owner: str, members: list[str]
) -> str:
    r = await http.post(
        f"{node.http_url}/v1/conversations",
        json={"kind": "group", "members": members, "title": "t"},
        headers={"Authorization": f"Bearer {stack.token(owner)}"},
    )
    assert r.status_code == 201, r.text
    conv: str = r.json()["id"]
    return conv


async def collect(
    client: AgoraClient, conv: str, count: int, timeout: float
) -> list[dict[str, Any]]:
    """The next `count` msg frames of `conv` (other frames are skipped)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            frame = await client.next_event("msg", timeout=remaining)
        except TimeoutError:
            break
        if frame["conv"] == conv:
            got.append(frame)
    return got


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")
