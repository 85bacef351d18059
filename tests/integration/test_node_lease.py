"""A gateway node's hold on Redis (gateway.node._keep_lease), each on a private Redis the
test breaks: the lease lost while the node stays subscribed (Redis emptied under it), and
Redis silent for a whole lease (the node sheds its clients with 1013, refuses new ones,
and takes them again once Redis answers). And the opposite: Redis healthy, but every
connection of the node's request pool held for several leases (as sends held them in
bench/RESULTS.md, run A3), which must cost neither the lease nor the clients; and one
renewal timing out (Redis slow for a moment), which must not cost the lease either."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from websockets.exceptions import InvalidStatus

from agora_client import AgoraClient
from core.settings import Settings
from fanout.envelope import Delivery, encode_delivery
from gateway.connection import Connection
from gateway.node import Node
from gateway.protocol.codec import JsonCodec
from storage.pools import ShardPools
from storage.redis_client import make_lease_redis, make_redis
from storage.redis_keys import RedisKeys
from tests.faults import OwnRedis
from tests.integration.helpers import create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

LEASE_S = 2  # the shortest allowed: renewals every 0.67 s, shed after 2 s of silence


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


async def written(probe: Callable[[], Awaitable[object]], timeout: float, what: str) -> None:
    """Wait, bounded, for a registration's write: the node logs "lease lost, registering
    again" as the registration begins, before it writes the lease and then the routes."""
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, f"{what} was not registered again in {timeout} s"
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
            route = keys.conv_routes(int(conv))
            await written(lambda: admin.sismember(route, node), 10, "the route")
            assert await admin.exists(keys.node_lease(node))
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
        lease = RedisKeys(settings.redis_prefix).node_lease(node)
        await written(lambda: admin.exists(lease), 10, "the lease")
        again = await AgoraClient.connect(g.ws_url, s.token(uid("r")), timeout=5)
        try:
            assert again.hello["node"] == node
            assert (await again.ping())["t"] == "pong"
        finally:
            await again.close()
    finally:
        s.stop_all()


class Socket:
    """The test's end of a connection's socket (gateway.connection.Link): what the node
    writes to it, and the close it sends."""

    paused = False
    idle = 0

    def __init__(self) -> None:
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    def write(self, data: bytes) -> None:
        self.frames.put_nowait(data)

    def ping(self) -> None:
        pass

    def buffered(self) -> int:
        return 0

    def send_close(self, code: int, reason: str) -> None:
        self.close_code = code
        self.closed.set()


async def test_a_node_whose_request_pool_is_held_keeps_its_lease_and_its_clients(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    # Run A3: pipelined sends held every connection of a gateway's Redis pool; the lease
    # renewal waited for one of them for a whole lease, and the node, its Redis healthy,
    # took Redis for gone and closed all its clients with 1013. Here the test holds every
    # connection of a node's request pool, beyond its pub/sub one, for three leases: the
    # renewal goes over the node's own lease connection, so the lease stays, the client is
    # not shed, and a delivery still reaches it. A node as gateway.app composes it (the
    # gateway in a process of its own would keep its pool out of the test's reach).
    pool_max = 2  # the pub/sub listener's connection and one more, which the test takes
    s = dataclasses.replace(settings, redis_pool_max=pool_max, route_lease_s=LEASE_S)
    redis, lease_redis = make_redis(s), make_lease_redis(s)
    node = Node(s, uid("held-node"), redis, pools, lease_redis)
    keys = RedisKeys(s.redis_prefix)
    pool = redis.connection_pool
    held: list[AbstractConnection] = []
    socket = Socket()
    user = uid("held")
    try:
        await node.start()  # returns once its pub/sub listener is subscribed
        conn = Connection(socket, JsonCodec(), user, 100, 1 << 20)
        await node.attach(conn)  # its user's route registered before the pool is taken
        for _ in range(pool_max - 1):
            # Waits (up to the pool's timeout) for a background command to let go of it.
            held.append(await pool.get_connection())
        assert not pool.can_get_connection(), "the request pool is not exhausted"

        # Waiting for something NOT to happen: the old node shed its clients once a whole
        # lease (2 s) had passed without a renewal, so three leases is ample.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(socket.closed.wait(), LEASE_S * 3)
        assert socket.close_code is None and not node.cut_off
        # Renewed meanwhile: a lease not renewed since the pool was taken, 6 s ago, would
        # have expired 4 s ago.
        assert 0 < await redis_client.pttl(keys.node_lease(node.id)) <= LEASE_S * 1000
        assert not pool.can_get_connection()  # held all along

        # Deliveries come in over the node's pub/sub connection, which it keeps.
        delivery = Delivery(user_frames=[(user, {"t": "notify", "n": {"id": "held-pool"}})])
        channel = keys.node_channel(node.id)
        assert await redis_client.publish(channel, encode_delivery(delivery)) == 1
        frame = await asyncio.wait_for(socket.frames.get(), 10)
        assert b'"held-pool"' in frame
        assert not socket.closed.is_set()
    finally:
        for c in held:
            await pool.release(c)
        await node.stop()
        await lease_redis.aclose()
        await redis.aclose()


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll the node's lease counters (what its lease loop counts is the event)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached in {seconds} s"
        await asyncio.sleep(0.01)


async def test_one_renewal_timing_out_is_retried_before_the_lease_expires(
    settings: Settings, pools: ShardPools, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    # A soak under load: Redis slow for a moment made one renewal time out. The renewal
    # had run an interval (a third of the lease) after the last one and timed out after
    # another; the next try, an interval later again, came when the lease expired, and
    # the node logged "lease lost, registering again". Here Redis takes no writes from
    # just after a renewal until after the next try has timed out, and answers well
    # before the lease renewed last expires: the try after the failed one must renew the
    # lease, without it ever being lost. Timeline from the renewal (lease 2 s): the next
    # try at 0.67 s, its timeout at 1.33 s, Redis writing again at 1.6 s, expiry at 2 s.
    pause_ms = 1600
    s = dataclasses.replace(settings, redis_url=own_redis.url, route_lease_s=LEASE_S)
    interval = LEASE_S / 3
    assert 2 * interval * 1000 < pause_ms < LEASE_S * 1000
    redis, lease_redis = make_redis(s), make_lease_redis(s)
    node = Node(s, uid("slow-node"), redis, pools, lease_redis)
    lease = RedisKeys(s.redis_prefix).node_lease(node.id)
    try:
        await node.start()
        await until(lambda: node.lease_renewals >= 1, LEASE_S * 3, "a first renewal")
        renewed = node.lease_renewals
        # Expiry stops while Redis is paused: only when it is writing again does the
        # lease's time run out, as with a Redis that was slow.
        await admin.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
        await until(lambda: node.lease_failures >= 1, LEASE_S * 3, "a renewal timing out")
        assert node.lease_renewals == renewed  # nothing renewed while Redis was paused
        await until(lambda: node.lease_renewals > renewed, LEASE_S * 3, "a renewal after it")
        assert node.lease_losses == 0, "the lease expired before the node renewed it"
        assert 0 < await admin.pttl(lease) <= LEASE_S * 1000
        # And the cadence is back to an interval: one renewal more, no failure, no loss.
        failures = node.lease_failures
        await until(lambda: node.lease_renewals > renewed + 1, LEASE_S * 3, "the next one")
        assert (node.lease_failures, node.lease_losses, node.cut_off) == (failures, 0, False)
    finally:
        await node.stop()
        await lease_redis.aclose()
        await redis.aclose()
