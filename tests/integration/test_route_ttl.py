"""Route sets are bounded: they expire unless a live member node refreshes them, so a dead
node's entries in sets nobody publishes to do not stay forever (real Redis)."""

from __future__ import annotations

import secrets

import pytest
import redis.asyncio as aioredis

from fanout.routing import ROUTE_REFRESH_S, ROUTE_TTL_S, Routes
from storage.redis_keys import RedisKeys

pytestmark = pytest.mark.engines


@pytest.fixture
def routes(redis_client: aioredis.Redis) -> Routes:
    return Routes(redis_client, RedisKeys(f"rtl{secrets.token_hex(3)}"))


async def test_every_route_set_is_written_with_a_ttl(routes: Routes) -> None:
    assert ROUTE_REFRESH_S < ROUTE_TTL_S / 2
    r, k = routes.redis, routes.keys
    await routes.register("n1", 30, [1], ["alice"])
    await routes.update("n1", add_convs=[2], add_users=["bob"])
    for key in (k.conv_routes(1), k.conv_routes(2), k.user_routes("alice"), k.user_routes("bob")):
        assert 0 < await r.ttl(key) <= ROUTE_TTL_S, key


async def test_refresh_pushes_the_expiry_back_and_remakes_lost_sets(routes: Routes) -> None:
    r, k = routes.redis, routes.keys
    await routes.register("n1", 30, [1, 2], ["alice"])
    await r.expire(k.conv_routes(1), 5)  # about to expire
    await r.delete(k.conv_routes(2))  # gone (say, expired while the node could not refresh)
    gone = await routes.refresh("n1", [1, 2], ["alice"])
    assert gone == 1
    assert await r.ttl(k.conv_routes(1)) > ROUTE_TTL_S - 60
    assert await r.smembers(k.conv_routes(2)) == {b"n1"}
    assert 0 < await r.ttl(k.conv_routes(2)) <= ROUTE_TTL_S
    assert await r.ttl(k.user_routes("alice")) > ROUTE_TTL_S - 60


async def test_a_set_shared_with_a_dead_node_lives_on_while_the_live_one_refreshes(
    routes: Routes,
) -> None:
    r, k = routes.redis, routes.keys
    await routes.register("dead", 30, [7], [])
    await routes.register("live", 30, [7], [])
    await r.expire(k.conv_routes(7), 3)
    await routes.refresh("live", [7], [])
    assert await r.ttl(k.conv_routes(7)) > ROUTE_TTL_S - 60
    # The dead node's set alone would go with its TTL: nothing refreshes it.
    await routes.register("dead", 30, [8], [])
    assert 0 < await r.ttl(k.conv_routes(8)) <= ROUTE_TTL_S


async def test_refresh_of_many_sets_goes_in_chunks(routes: Routes) -> None:
    convs = list(range(1, 4501))  # more than one pipeline chunk
    await routes.register("n1", 30, convs, [])
    pipe = routes.redis.pipeline(transaction=False)
    for c in convs:
        pipe.expire(routes.keys.conv_routes(c), 100)
    await pipe.execute()
    assert await routes.refresh("n1", convs, []) == 0
    ttls = await routes.redis.ttl(routes.keys.conv_routes(4500))
    assert ttls > ROUTE_TTL_S - 60
