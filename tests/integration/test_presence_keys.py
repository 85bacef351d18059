"""Presence keys of the wrong type (something SET a string at a user's presence hash or
route set) cost that user alone: the presence writes of a node go out for many users in
one script call (a batch of users coming online) or pipeline (going offline), and one
WRONGTYPE failed the whole batch, retried for as long as the key stayed bad: nobody else
on that node went online or offline meanwhile. A bad presence hash is replaced; a bad
route set holds no gateway. Real Redis and PostgreSQL; the links are recording sockets."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from gateway.connection import Connection
from gateway.node import Node
from gateway.protocol.codec import JsonCodec
from gateway.protocol.frames import CloseCode
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.integration.helpers import running_node, uid
from tests.integration.test_node_lease import Socket

pytestmark = pytest.mark.engines


@pytest.fixture
async def node(settings: Settings, pools: ShardPools) -> AsyncIterator[Node]:
    async with running_node(
        dataclasses.replace(settings, presence_grace_s=1), pools, "pk-node"
    ) as node:
        yield node


async def on_of(r: aioredis.Redis, keys: RedisKeys, user: str) -> bytes | None:
    value: bytes | None = await r.hget(keys.presence(user), "on")
    return value


async def settled(node: Node) -> None:
    """The node's presence writes are all out (a failing batch never is: time out)."""
    await asyncio.wait_for(node.presence.changes.idle(), 5)


async def test_a_bad_presence_key_costs_its_user_alone(
    node: Node, redis_client: aioredis.Redis
) -> None:
    r, keys = redis_client, node.keys
    spoilt, fine = uid("pk-bad"), uid("pk-ok")
    await r.set(keys.presence(spoilt), "not a hash")
    conns = [Connection(Socket(), JsonCodec(), u, 100, 1 << 20) for u in (spoilt, fine)]
    for c in conns:
        c.on_close(node.detach)
    await asyncio.gather(*(node.attach(c) for c in conns))  # one batch of presence writes
    await settled(node)
    assert await on_of(r, keys, fine) == b"1"
    assert await on_of(r, keys, spoilt) == b"1"  # replaced by a hash, online

    # Going offline: a route set that is not a set holds no other gateway.
    await r.set(keys.user_routes(spoilt), "not a set")
    for c in conns:
        c.close(CloseCode.GOING_AWAY)
    async with asyncio.timeout(10):  # the grace (1 s), then the offline batch
        while await on_of(r, keys, fine) != b"0":
            await asyncio.sleep(0.05)
    await settled(node)
    assert await on_of(r, keys, spoilt) == b"0"
