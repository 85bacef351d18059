"""Presence announcements of two gateways arrive in the order of the state they announce.

A user leaves gateway A and, after the grace, A writes them offline and announces it; the
announcement first reads the user's rooms from PostgreSQL. Meanwhile the user connects to
gateway B, which writes them online and announces that. Each announcement was published
after its own write, independently: when A's was slower (a slow read), B's "online" reached
the user's contacts first and A's "offline" after it, and they showed the user offline
while they were online, until their next change. Here A's PostgreSQL pool is held while it
announces, until B's announcement is delivered. Real Redis and PostgreSQL; two nodes in
this process; the watcher's link is a recording socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from fanout.envelope import Delivery, encode_delivery
from gateway.connection import Connection
from gateway.node import Node
from gateway.protocol.codec import JsonCodec
from gateway.protocol.frames import CloseCode
from storage import conversations
from storage.ids import IdGenerator
from storage.pools import ShardPools
from storage.redis_client import make_lease_redis, make_redis
from tests.integration.helpers import uid
from tests.integration.test_node_lease import Socket

pytestmark = pytest.mark.engines


def _json(data: bytes) -> dict[str, Any]:
    """A frame as written to the socket: the WebSocket header, then the JSON text."""
    frame: dict[str, Any] = json.loads(data[data.index(b"{") :])
    return frame


async def presence_frame(sock: Socket, user: str) -> dict[str, Any]:
    while True:
        frame = _json(await asyncio.wait_for(sock.frames.get(), 10))
        if frame.get("t") == "presence" and frame.get("user") == user:
            return frame


async def test_a_late_offline_of_one_gateway_does_not_follow_the_online_of_another(
    settings: Settings, pools: ShardPools, ids: IdGenerator, redis_client: aioredis.Redis
) -> None:
    s = dataclasses.replace(settings, presence_grace_s=1)
    a_pools = ShardPools(dataclasses.replace(s, pg_pool_max=1))  # A's own, for the test to hold
    clients = [make_redis(s), make_lease_redis(s), make_redis(s), make_lease_redis(s)]
    a = Node(s, uid("po-a"), clients[0], a_pools, clients[1])
    b = Node(s, uid("po-b"), clients[2], pools, clients[3])
    user, watcher = uid("po-u"), uid("po-w")
    conv = (await conversations.create_group(pools, ids, user, [watcher], "order")).id
    await a.start()
    await b.start()
    held = contextlib.AsyncExitStack()
    try:
        sock = Socket()
        await b.subscribe(Connection(sock, JsonCodec(), watcher, 1000, 1 << 20), conv, None)
        on_a = Connection(Socket(), JsonCodec(), user, 100, 1 << 20)
        on_a.on_close(a.detach)
        await a.attach(on_a)
        assert (await presence_frame(sock, user))["online"] is True

        # A's reads of the user's rooms wait (every connection of its pools held) ...
        for physical in range(a_pools.physical_count):
            await held.enter_async_context(a_pools.connection(physical))
        on_a.close(CloseCode.GOING_AWAY)
        key = a.keys.presence(user)
        async with asyncio.timeout(10):  # ... once the grace is over and it wrote offline
            while await redis_client.hget(key, "on") != b"0":
                await asyncio.sleep(0.02)
        # The user is back, on B: online again, announced while A's offline waits.
        on_b = Connection(Socket(), JsonCodec(), user, 100, 1 << 20)
        on_b.on_close(b.detach)
        await b.attach(on_b)
        frames = [await presence_frame(sock, user)]
        assert frames[0]["online"] is True
        await held.aclose()  # A's announcement goes on
        await asyncio.wait_for(a.presence.changes.idle(), 10)
        await asyncio.wait_for(b.presence.changes.idle(), 10)
        # A's "offline", if it was published, came on B's channel before this marker.
        marker = encode_delivery(Delivery(typing=[(conv, "po-marker")]))
        await redis_client.publish(b.keys.node_channel(b.id), marker)
        while True:
            frame = _json(await asyncio.wait_for(sock.frames.get(), 10))
            if frame.get("t") == "typing":
                break
            if frame.get("t") == "presence" and frame.get("user") == user:
                frames.append(frame)
        assert await redis_client.hget(key, "on") == b"1"
        assert [f["online"] for f in frames] == [True], "the watcher sees the user offline"
    finally:
        await held.aclose()
        await a.stop()
        await b.stop()
        for c in clients:
            await c.aclose()
        await a_pools.close()
