"""The routing registry on real Redis: leases, pruning of dead nodes, batched updates."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
import redis.asyncio as aioredis

from fanout.envelope import Delivery, decode_delivery
from fanout.routing import Routes
from gateway.routesync import RouteSync
from storage.redis_keys import RedisKeys

pytestmark = pytest.mark.engines


@pytest.fixture
def routes(redis_client: aioredis.Redis) -> Routes:
    return Routes(redis_client, RedisKeys(f"rt{secrets.token_hex(3)}"))


async def test_live_nodes_are_found_and_dead_ones_pruned(routes: Routes) -> None:
    await routes.register("n1", 30, [1, 2], ["alice"])
    await routes.register("n2", 30, [2], [])
    by_conv, by_user = await routes.nodes_for(convs=[1, 2, 3], users=["alice", "bob"])
    assert by_conv == {1: {"n1"}, 2: {"n1", "n2"}, 3: set()}
    assert by_user == {"alice": {"n1"}, "bob": set()}
    await routes.redis.delete(routes.keys.node_lease("n2"))  # n2 died: its lease is gone
    routes._alive.clear()  # skip the 1 s liveness cache
    by_conv, _ = await routes.nodes_for(convs=[2])
    assert by_conv == {2: {"n1"}}
    assert await routes.redis.smembers(routes.keys.conv_routes(2)) == {b"n1"}  # pruned


async def test_a_dead_node_is_pruned_from_user_routes_and_only_where_it_was(
    routes: Routes,
) -> None:
    await routes.register("n1", 30, [1], ["alice", "bob"])
    await routes.register("n2", 30, [2], ["alice"])
    await routes.redis.delete(routes.keys.node_lease("n2"))  # n2 died
    routes._alive.clear()
    by_conv, by_user = await routes.nodes_for(convs=[1, 2], users=["alice", "bob"])
    assert by_conv == {1: {"n1"}, 2: set()}
    assert by_user == {"alice": {"n1"}, "bob": {"n1"}}
    r = routes.redis
    assert await r.smembers(routes.keys.conv_routes(1)) == {b"n1"}  # had no dead node
    assert await r.smembers(routes.keys.conv_routes(2)) == set()  # pruned
    assert await r.smembers(routes.keys.user_routes("alice")) == {b"n1"}  # pruned
    assert await r.smembers(routes.keys.user_routes("bob")) == {b"n1"}
    assert await routes.nodes_for() == ({}, {})  # nothing asked: nothing to look up


async def test_renew_reports_a_lost_lease(routes: Routes) -> None:
    await routes.register("n1", 30, [], [])
    assert await routes.renew("n1", 30) is True
    await routes.redis.delete(routes.keys.node_lease("n1"))
    assert await routes.renew("n1", 30) is False


async def test_one_publish_per_node_carries_the_whole_batch(routes: Routes) -> None:
    pubsub = routes.redis.pubsub()
    await pubsub.subscribe(routes.keys.node_channel("n1"))
    # The subscribe confirmation: until Redis has it, a publish (on another connection)
    # reaches nobody, so wait for it rather than give up after a second.
    confirmed = await pubsub.get_message(timeout=10)
    assert confirmed is not None and confirmed["type"] == "subscribe", confirmed
    await routes.publish({"n1": Delivery(typing=[(1, "a"), (2, "b")])})
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
    assert msg is not None and decode_delivery(msg["data"]).typing == [(1, "a"), (2, "b")]
    await pubsub.aclose()


async def test_route_sync_batches_and_ends_equal_to_local_state(routes: Routes) -> None:
    local: dict[int, int] = {}  # conv -> local subscribers
    sync = RouteSync(routes, "n1", lambda c: local.get(c, 0) > 0, lambda u: False)
    runner = asyncio.create_task(sync.run())
    try:

        async def subscribe(conv: int) -> None:
            local[conv] = local.get(conv, 0) + 1
            sync.changed(convs=(conv,))
            await sync.ensure(conv=conv)

        await asyncio.gather(*(subscribe(c) for c in range(200)))
        print(f"200 subscribes took {sync.flushes} route updates")
        assert sync.flushes <= 3
        for c in range(200):
            assert await routes.redis.sismember(routes.keys.conv_routes(c), "n1")
        # Unsubscribe racing a new subscribe of the same conversation: it must stay.
        local[5] = 0
        sync.changed(convs=(5,))
        await subscribe(5)
        for c in range(100, 200):
            local[c] = 0
            sync.changed(convs=(c,))
        await sync.ensure(conv=5)
        # Until the later unsubscribes are flushed too: then conversation 5's fate is known.
        deadline = time.monotonic() + 10
        for c in (100, 150, 199):
            while await routes.redis.sismember(routes.keys.conv_routes(c), "n1"):
                assert time.monotonic() < deadline, f"conv {c} still routed after 10 s"
                await asyncio.sleep(0.02)
        assert await routes.redis.sismember(routes.keys.conv_routes(5), "n1")
    finally:
        runner.cancel()


async def test_a_node_late_to_renew_but_still_listening_is_not_pruned(routes: Routes) -> None:
    await routes.register("busy", 30, [7], [])
    pubsub = routes.redis.pubsub()
    await pubsub.subscribe(routes.keys.node_channel("busy"))
    await routes.redis.delete(routes.keys.node_lease("busy"))  # renewed too late
    by_conv, _ = await routes.nodes_for(convs=[7])
    assert by_conv == {7: {"busy"}}
    assert await routes.redis.sismember(routes.keys.conv_routes(7), "busy")
    await pubsub.aclose()  # now it is really gone
    channel = routes.keys.node_channel("busy")
    deadline = time.monotonic() + 10
    while sum(n for _, n in await routes.redis.pubsub_numsub(channel)):
        assert time.monotonic() < deadline, "the listener is still subscribed after 10 s"
        await asyncio.sleep(0.02)
    routes._alive.clear()
    by_conv, _ = await routes.nodes_for(convs=[7])
    assert by_conv == {7: set()}
