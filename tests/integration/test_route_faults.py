"""Route sets that are not sets (something SET a string at a conversation's route key):
one bad key must cost that key alone, never the other conversations and users of the same
route batch, registration or lookup. The node's writes repair the key (it is replaced by
a set holding the node: a non-set there held no node's registration anyway); lookups take
it for a set with no node in it. Real Redis, over redis-py's pipeline and over the
node's pipelined line (storage/redisline.py), as a single-Redis gateway writes its routes."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from fanout.routing import Routes
from gateway.routesync import RouteSync
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine

pytestmark = pytest.mark.engines


@pytest.fixture(params=["pipeline", "line"])
async def routes(
    request: pytest.FixtureRequest, redis_client: aioredis.Redis, settings: Settings
) -> AsyncIterator[Routes]:
    line = RedisLine(settings.redis_url, 5) if request.param == "line" else None
    try:
        yield Routes(redis_client, RedisKeys(f"rf{secrets.token_hex(3)}"), line)
    finally:
        if line is not None:
            line.close()


async def spoil(routes: Routes, key: str) -> None:
    await routes.redis.set(key, "not a set")


async def test_a_bad_route_key_fails_no_other_registration_of_its_batch(routes: Routes) -> None:
    # Before: the batch's pipeline raised on the one WRONGTYPE, RouteSync failed every
    # waiter of the batch (each subscribe and connect: 1013) and retried the whole batch,
    # which failed again, for as long as the key stayed bad.
    local = {1, 2, 3}
    sync = RouteSync(routes, "n1", lambda c: c in local, lambda u: u == "alice")
    await spoil(routes, routes.keys.conv_routes(2))
    runner = asyncio.create_task(sync.run())
    try:
        sync.changed(convs=(1, 2, 3), users=("alice",))
        waits = [sync.ensure(conv=c) for c in (1, 2, 3)] + [sync.ensure(user="alice")]
        await asyncio.wait_for(asyncio.gather(*waits), 10)
        for c in (1, 2, 3):
            assert await routes.redis.smembers(routes.keys.conv_routes(c)) == {b"n1"}
            assert await routes.redis.ttl(routes.keys.conv_routes(c)) > 0
        assert await routes.redis.smembers(routes.keys.user_routes("alice")) == {b"n1"}
        assert sync.backoff.streak == 0
        # Dropping a route whose key is bad: nothing to drop, the batch succeeds.
        await spoil(routes, routes.keys.conv_routes(3))
        local.discard(3)
        sync.changed(convs=(3, 1))
        await asyncio.wait_for(sync.ensure(conv=1), 10)
        flushes = sync.flushes
        sync.changed(convs=(3,))
        async with asyncio.timeout(10):
            while sync.flushes == flushes:  # the drop's batch went out (and did not fail)
                await asyncio.sleep(0.01)
        assert sync.backoff.streak == 0
    finally:
        runner.cancel()


async def test_registering_repairs_a_bad_route_key_and_registers_the_rest(
    routes: Routes,
) -> None:
    # Before: register's pipeline raised after setting the lease (the node's lease loop
    # then took the registration for failed, or a node could not start at all).
    await spoil(routes, routes.keys.conv_routes(7))
    await spoil(routes, routes.keys.user_routes("bob"))
    await routes.register("n1", 30, [6, 7, 8], ["bob", "carol"])
    for c in (6, 7, 8):
        assert await routes.redis.smembers(routes.keys.conv_routes(c)) == {b"n1"}
    for u in ("bob", "carol"):
        assert await routes.redis.smembers(routes.keys.user_routes(u)) == {b"n1"}
        assert await routes.redis.ttl(routes.keys.user_routes(u)) > 0
    assert await routes.renew("n1", 30)


async def test_a_lookup_takes_a_bad_route_key_for_no_node(routes: Routes) -> None:
    # Before: nodes_for raised, failing a fan-out batch for every conversation in it.
    await routes.register("n1", 30, [1, 3], ["dave"])
    await spoil(routes, routes.keys.conv_routes(2))
    await spoil(routes, routes.keys.user_routes("erin"))
    by_conv, by_user = await routes.nodes_for(convs=[1, 2, 3], users=["dave", "erin"])
    assert by_conv == {1: {"n1"}, 2: set(), 3: {"n1"}}
    assert by_user == {"dave": {"n1"}, "erin": set()}
