"""A gateway node's hold on Redis (gateway.node._keep_lease), each on a private Redis the
test breaks: the lease lost while the node stays subscribed (Redis emptied under it), and
Redis silent for a whole lease (the node sheds its clients with 1013, refuses new ones,
and takes them again once Redis answers)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from agora_client import AgoraClient
from core.settings import Settings
from storage.redis_keys import RedisKeys
from tests.faults import OwnRedis
from tests.integration.helpers import create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

LEASE_S = 2  # the shortest allowed: renewals every 0.67 s, shed after 2 s of silence


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    redis = OwnRedis()
    redis.start()
    try:
        yield redis
    finally:
        if redis.proc is not None:
            redis.proc.send_signal(signal.SIGCONT)  # a test that failed while it was stopped
        redis.kill()


@pytest.fixture
async def admin(own_redis: OwnRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


def lease_stack(settings: Settings, redis: OwnRedis) -> Stack:
    return Stack(
        settings, extra_env={"AGORA_REDIS_URL": redis.url, "AGORA_ROUTE_LEASE_S": str(LEASE_S)}
    )


async def wait_log(node: Proc, text: str, timeout: float, after: int = 0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log_text()[after:]:
        assert time.monotonic() < deadline, f"{node.name} did not log {text!r}"
        await asyncio.sleep(0.05)


async def test_a_node_whose_routes_vanish_registers_them_again_and_keeps_delivering(
    settings: Settings, http: httpx.AsyncClient, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    # Redis emptied under a running node (FLUSHALL; a failover to an empty replica looks
    # the same) without dropping its pub/sub connection: its lease and route sets are gone,
    # so publishers would find no node for the conversation. The next renewal finds the
    # lease missing and registers everything again: the subscriber gets the next message
    # live, long before the periodic tail check (30 s) could have filled it.
    s = lease_stack(settings, own_redis)
    try:
        g = s.gateway("lease-g")
        s.fanout("lease-f")
        a, b = uid("a"), uid("b")
        conv = await create_group(http, s, g, a, [b])
        reader = await AgoraClient.connect(g.ws_url, s.token(b))
        writer = await AgoraClient.connect(g.ws_url, s.token(a))
        try:
            await reader.sub(conv)
            node = reader.hello["node"]
            keys = RedisKeys(settings.redis_prefix)
            assert await admin.sismember(keys.conv_routes(int(conv)), node)
            offset = len(g.log_text())
            await admin.flushall()
            await wait_log(g, "lease lost, registering again", 10, offset)
            assert await admin.exists(keys.node_lease(node))
            assert await admin.sismember(keys.conv_routes(int(conv)), node)
            ack = await writer.send(conv, "after the flush", cid="after")
            got = await reader.next_event("msg", timeout=10)
            assert (got["id"], got["body"]) == (ack["id"], "after the flush")
            assert not reader.closed.is_set() and not writer.closed.is_set()
        finally:
            await reader.close()
            await writer.close()
    finally:
        s.stop_all()


async def test_a_node_cut_off_from_redis_sheds_with_1013_refuses_then_readmits(
    settings: Settings, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    # Redis stopped (SIGSTOP: connections stay open, nothing answers, as when the network
    # drops packets) for longer than a lease: renewals time out, and once a whole lease
    # has passed without an answer the node closes its clients with 1013 (they resume on
    # another node) and refuses new ones with 503. When Redis answers again the node
    # admits clients again, and its lease, which lapsed meanwhile, is registered again.
    s = lease_stack(settings, own_redis)
    s.expect_log(r"Redis unreachable for [\d.]+ s; closing 1 connections with 1013")
    assert own_redis.proc is not None
    try:
        g = s.gateway("cutoff-g")
        client = await AgoraClient.connect(g.ws_url, s.token(uid("c")))
        node = client.hello["node"]
        try:
            own_redis.proc.send_signal(signal.SIGSTOP)
            await asyncio.wait_for(client.closed.wait(), LEASE_S * 5)
            assert client.close_code == 1013
            assert client.ws.close_reason == "this node lost Redis; reconnect"
            with pytest.raises(InvalidStatus) as refused:
                await AgoraClient.connect(g.ws_url, s.token(uid("n")), timeout=5)
            response = refused.value.response
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "2"
            assert b"redis unreachable" in response.body
            offset = len(g.log_text())
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
            await client.close()
        await wait_log(g, "Redis answers again; accepting connections", 10, offset)
        await wait_log(g, "lease lost, registering again", 10, offset)
        assert await admin.exists(RedisKeys(settings.redis_prefix).node_lease(node))
        again = await AgoraClient.connect(g.ws_url, s.token(uid("r")), timeout=5)
        try:
            assert again.hello["node"] == node
            assert (await again.ping())["t"] == "pong"
        finally:
            await again.close()
    finally:
        s.stop_all()
