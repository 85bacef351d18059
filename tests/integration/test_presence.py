"""Presence across gateways: connect, drop, the grace period, reconnect elsewhere, a
gateway killed outright. Three gateway processes and the real engines."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agora_client import AgoraClient
from core.settings import Settings
from tests.integration.helpers import create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines
GRACE_S = 2
LEASE_S = 3


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    env = {
        "AGORA_PRESENCE_GRACE_S": str(GRACE_S),
        "AGORA_ROUTE_LEASE_S": str(LEASE_S),
        "AGORA_PRESENCE_MAX_MEMBERS": "3",
    }
    s = Stack(settings, extra_env=env)
    try:
        s.gateway("pr-g1")
        s.gateway("pr-g2")
        s.fanout("pr-f1")
        yield s
    finally:
        s.stop_all()


async def presence_of(
    client: AgoraClient, user: str, timeout: float
) -> tuple[dict[str, Any], float]:
    """The next `presence` frame about `user`, and how long it took."""
    started = time.monotonic()
    while True:
        frame = await client.next_event("presence", timeout=timeout)
        if frame["user"] == user:
            return frame, time.monotonic() - started


async def listed(
    http: httpx.AsyncClient, stack: Stack, node: Proc, viewer: str, conv: str
) -> dict[str, Any]:
    r = await http.get(
        f"{node.http_url}/v1/conversations/{conv}/presence",
        headers={"Authorization": f"Bearer {stack.token(viewer)}"},
    )
    assert r.status_code == 200, r.text
    return {i["user"]: i for i in r.json()["items"]}


async def test_online_grace_reconnect_elsewhere_then_offline(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    watcher = await AgoraClient.connect(g1.ws_url, stack.token(a))
    await watcher.sub(conv)
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    frame, _ = await presence_of(watcher, b, 10)
    assert frame["online"] is True and frame["last_seen"] is None
    assert (await listed(http, stack, g2, a, conv))[b]["online"] is True

    # A reconnect to the other gateway within the grace period: nothing flaps.
    await cb.close()
    cb = await AgoraClient.connect(g1.ws_url, stack.token(b))
    with pytest.raises(TimeoutError):
        await presence_of(watcher, b, GRACE_S + 2)
    # A second device leaving changes nothing either while the first stays.
    other = await AgoraClient.connect(g2.ws_url, stack.token(b))
    await other.close()
    with pytest.raises(TimeoutError):
        await presence_of(watcher, b, GRACE_S + 2)

    before = int(time.time() * 1000)
    await cb.close()
    frame, took = await presence_of(watcher, b, GRACE_S + 10)
    print(f"offline after {took:.1f}s (grace {GRACE_S}s)")
    assert frame["online"] is False and frame["last_seen"] >= before
    assert took >= GRACE_S - 0.5
    state = (await listed(http, stack, g1, a, conv))[b]
    assert state["online"] is False and state["last_seen"] == frame["last_seen"]
    await watcher.close()


async def test_a_killed_gateway_leaves_its_users_offline(
    stack: Stack, g1: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    doomed = stack.gateway("pr-g3")
    watcher = await AgoraClient.connect(g1.ws_url, stack.token(a))
    await watcher.sub(conv)
    cb = await AgoraClient.connect(doomed.ws_url, stack.token(b))
    frame, _ = await presence_of(watcher, b, 10)
    assert frame["online"] is True
    doomed.kill()  # no detach, no goodbye: the sweep of another gateway notices
    frame, took = await presence_of(watcher, b, LEASE_S + 3 * GRACE_S + 15)
    print(f"offline {took:.1f}s after the kill (lease {LEASE_S}s, grace {GRACE_S}s)")
    assert frame["online"] is False
    await cb.close()
    await watcher.close()


async def test_big_rooms_get_no_frames_but_list_presence(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    big = await create_group(http, stack, g1, a, [b, uid("c"), uid("d")])  # 4 > 3
    watcher = await AgoraClient.connect(g1.ws_url, stack.token(a))
    await watcher.sub(big)
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    with pytest.raises(TimeoutError):
        await presence_of(watcher, b, 3)
    states = await listed(http, stack, g2, a, big)
    assert states[b]["online"] is True and states[a]["online"] is True
    assert len(states) == 4
    r = await http.get(
        f"{g1.http_url}/v1/conversations/{big}/presence?online=true&limit=1",
        headers={"Authorization": f"Bearer {stack.token(a)}"},
    )
    body = r.json()
    assert r.status_code == 200 and body["next"] is not None
    assert all(i["online"] for i in body["items"])
    await cb.close()
    await watcher.close()
    await asyncio.sleep(0)


async def test_a_post_thread_gets_counts_only_at_most_once_a_second(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    author = uid("w")
    r = await http.post(
        f"{g1.http_url}/v1/posts",
        json={"title": "watch me", "community": "presence"},
        headers={"Authorization": f"Bearer {stack.token(author)}"},
    )
    assert r.status_code == 201, r.text
    thread = r.json()["thread"]
    readers = [
        await AgoraClient.connect((g1 if i % 2 else g2).ws_url, stack.token(uid("r")))
        for i in range(3)
    ]
    for c in readers:
        await c.sub(thread)

    async def count_reaches(client: AgoraClient, value: int) -> list[float]:
        stamps: list[float] = []
        while True:
            f = await client.next_event("presence_count", timeout=10)
            assert f["conv"] == thread
            stamps.append(time.monotonic())
            if f["online"] == value:
                return stamps

    for c in readers:
        await count_reaches(c, 3)
    await readers[0].close()
    for c in readers[1:]:
        stamps = await count_reaches(c, 2)
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert all(g >= 0.9 for g in gaps), gaps  # at most once a second
    with pytest.raises(TimeoutError):  # no user-level presence frames for a thread
        await readers[1].next_event("presence", timeout=1)
    for c in readers[1:]:
        await c.close()
