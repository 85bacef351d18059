"""Shared steps of the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agora_client import AgoraClient
from core.settings import Settings
from fanout.sequencer import sequence
from gateway.node import Node
from storage import messages
from storage.ids import IdGenerator, now_ms, shard_of_id
from storage.models import Message, NewMessage
from storage.pools import ShardPools
from storage.redis_client import make_lease_redis, make_redis
from tests.engines import settings_env
from tests.stack import Proc, Stack


def agora(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `agora` command line (gateway/cli.py) with `settings` and nothing else of
    the test process's AGORA_* environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update(settings_env(settings))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def uid(prefix: str) -> str:
    # 40 random bits: a suite makes hundreds of ids of one prefix against one Redis, and
    # at 24 bits two of them met about once in a thousand runs.
    return f"{prefix}-{secrets.token_hex(5)}"


@contextlib.asynccontextmanager
async def running_node(
    settings: Settings, pools: ShardPools, name: str, lease_url: str | None = None
) -> AsyncIterator[Node]:
    """A node as gateway.app composes it (Redis clients of its own; the lease's through
    `lease_url` when given: a proxy in front of Redis), started; stopped and its clients
    closed at the end."""
    lease_settings = (
        settings if lease_url is None else dataclasses.replace(settings, redis_url=lease_url)
    )
    redis, lease_redis = make_redis(settings), make_lease_redis(lease_settings)
    node = Node(settings, uid(name), redis, pools, lease_redis)
    try:
        await node.start()
        yield node
    finally:
        await node.stop()
        await lease_redis.aclose()
        await redis.aclose()


async def store_texts(
    pools: ShardPools, ids: IdGenerator, conv: int, sender: str, n: int
) -> list[Message]:
    """Sequence `n` texts of `sender` into `conv` as the fan-out worker does (no broker):
    the stored messages, with their seqs."""
    batch = [
        NewMessage(
            conv, ids.next_id(shard_of_id(conv)), sender, uid("c"), f"m{i}", now_ms(), "text"
        )
        for i in range(n)
    ]
    return (await sequence(pools, batch)).stored


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


async def create_direct(
    http: httpx.AsyncClient, stack: Stack, node: Proc, owner: str, other: str
) -> str:
    r = await http.post(
        f"{node.http_url}/v1/conversations",
        json={"kind": "direct", "members": [other]},
        headers={"Authorization": f"Bearer {stack.token(owner)}"},
    )
    assert r.status_code in (200, 201), r.text
    conv: str = r.json()["id"]
    return conv


async def collect(
    client: AgoraClient, conv: str, count: int, timeout: float
) -> list[dict[str, Any]]:
    """The next `count` msg frames of `conv` (frames of other conversations are skipped:
    to wait on several conversations of one client, use `collect_each`)."""
    return (await collect_each(client, {conv: count}, timeout))[conv]


async def collect_each(
    client: AgoraClient, counts: dict[str, int], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """The next msg frames of several conversations at once, at least `counts[conv]` of
    each (frames of others are skipped). Only the order within one conversation is
    promised (docs/protocol.md), so collecting one conversation after another would skip,
    and lose, a frame of the next one that came first."""
    got: dict[str, list[dict[str, Any]]] = {conv: [] for conv in counts}
    deadline = time.monotonic() + timeout
    while any(len(got[conv]) < n for conv, n in counts.items()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            frame = await client.next_event("msg", timeout=remaining)
        except TimeoutError:
            break
        if frame["conv"] in got:
            got[frame["conv"]].append(frame)
    return got


async def metric(node: Proc, name: str, **labels: str) -> float:
    """The sum of `name`'s samples on `node`'s /metrics whose labels include `labels`."""
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{node.http_url}/metrics")
    assert r.status_code == 200, r.text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in r.text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and all(w in sample for w in want):
            total += float(value)
    return total


async def wait_close_counted(node: Proc, code: int, timeout: float, at_least: int = 1) -> None:
    """Until `node` has closed `at_least` connections with `code` (agora_ws_closes_total)."""
    deadline = time.monotonic() + timeout
    while (n := await metric(node, "agora_ws_closes_total", code=str(code))) < at_least:
        assert time.monotonic() < deadline, f"{node.name}: {n} closes with {code}"
        await asyncio.sleep(0.1)


async def wait_stored(
    pools: ShardPools, conv: str, count: int, timeout: float, fence: str | None = None
) -> list[Message]:
    """`conv`'s stored messages once there are at least `count` and, with `fence`, one
    with that cid among them (fails after `timeout`).

    A fence is a message sent after the ones a test checks: a conversation's messages are
    stored in the order they were sent, so once the fence is stored, whatever was sent
    before it (a duplicate included) is stored too; no sleep "for it to show up"."""
    deadline = time.monotonic() + timeout
    while True:
        stored = await messages.after(pools, int(conv), 0, count + 1000)
        if len(stored) >= count and (fence is None or any(m.cid == fence for m in stored)):
            return stored
        assert time.monotonic() < deadline, f"{len(stored)} of {count} messages stored"
        await asyncio.sleep(0.05)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def auth(stack: Stack, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.token(user)}"}
