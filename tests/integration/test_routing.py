"""The routing registry on real Redis: leases, pruning of dead nodes, batched updates."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from fanout.envelope import Delivery, decode_delivery, encode_delivery
from fanout.routing import Routes
from gateway.routesync import RouteSync
from storage.models import Message
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine

pytestmark = pytest.mark.engines


@pytest.fixture(params=["pool", "line"])
def routes(
    redis_client: aioredis.Redis, settings: Settings, request: pytest.FixtureRequest
) -> Iterator[Routes]:
    """Over redis-py's pool, or with the pipelined line (storage/redisline.py) that a
    fan-out worker publishes over (and a gateway updates its routes over)."""
    line = RedisLine(settings.redis_url, 5) if request.param == "line" else None
    yield Routes(redis_client, RedisKeys(f"rt{secrets.token_hex(3)}"), line)
    if line is not None:
        line.close()


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


def _message(conv: int, seq: int, body: str = "hi") -> Message:
    return Message(conv, 1000 * conv + seq, seq, "alice", body, 1, f"c{conv}-{seq}", "text")


async def _listen(routes: Routes, *nodes: str) -> Any:
    pubsub = routes.redis.pubsub()
    await pubsub.subscribe(*(routes.keys.node_channel(n) for n in nodes))
    for _ in nodes:  # until Redis has every subscription (see the test above)
        confirmed = await pubsub.get_message(timeout=10)
        assert confirmed is not None and confirmed["type"] == "subscribe", confirmed
    return pubsub


async def _received(pubsub: Any, count: int) -> dict[str, bytes]:
    """The next `count` publishes, by node; then none more within 0.2 s."""
    got: dict[str, bytes] = {}
    for _ in range(count):
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
        assert msg is not None, f"only {len(got)} of {count} deliveries"
        node = msg["channel"].decode().rsplit(":", 1)[1]
        assert node not in got, f"two deliveries to {node}"
        got[node] = msg["data"]
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    return got


async def test_a_batch_goes_to_each_live_node_in_one_delivery_as_before(routes: Routes) -> None:
    await routes.register("n1", 30, [1, 2], [])
    await routes.register("n2", 30, [2, 3], [])
    await routes.register("gone", 30, [1, 3], [])
    await routes.redis.delete(routes.keys.node_lease("gone"))  # died, not listening
    pubsub = await _listen(routes, "n1", "n2")
    by_conv = {1: [_message(1, 1), _message(1, 2)], 2: [_message(2, 7)], 3: [_message(3, 1)]}
    by_conv[2] += [_message(2, 8, "x" * 300)] + [_message(2, 9 + i) for i in range(20)]
    assert await routes.publish_messages(by_conv) == 2
    got = await _received(pubsub, 2)
    # Byte for byte what the two round trips published (encode_delivery), in the same order.
    assert got["n1"] == encode_delivery(Delivery(messages=by_conv[1] + by_conv[2]))
    assert got["n2"] == encode_delivery(Delivery(messages=by_conv[2] + by_conv[3]))
    assert decode_delivery(got["n2"]).messages == by_conv[2] + by_conv[3]
    # The dead node was pruned where it was found, and only there.
    r = routes.redis
    assert await r.smembers(routes.keys.conv_routes(1)) == {b"n1"}
    assert await r.smembers(routes.keys.conv_routes(3)) == {b"n2"}
    assert await r.smembers(routes.keys.conv_routes(2)) == {b"n1", b"n2"}
    assert await routes.publish_messages({4: [_message(4, 1)]}) == 0  # nobody serves it
    assert await routes.publish_messages({}) == 0
    if routes.line is not None:
        assert routes.line.connects == 1  # published over the line, not the pool
    await pubsub.aclose()


async def test_a_node_late_to_renew_but_listening_gets_the_batch_and_keeps_its_routes(
    routes: Routes,
) -> None:
    await routes.register("busy", 30, [7], [])
    pubsub = await _listen(routes, "busy")
    await routes.redis.delete(routes.keys.node_lease("busy"))  # renewed too late
    assert await routes.publish_messages({7: [_message(7, 1)]}) == 1
    got = await _received(pubsub, 1)
    assert decode_delivery(got["busy"]).messages == [_message(7, 1)]
    assert await routes.redis.sismember(routes.keys.conv_routes(7), "busy")
    await pubsub.aclose()


async def test_a_node_that_registers_before_the_publish_gets_it(routes: Routes) -> None:
    """The routes are read when the batch is published (after its commit), never from
    before: a node registering in between is not missed, even one that was found dead
    and pruned a moment ago (a gateway that lost its lease and registered again)."""
    await routes.register("n1", 30, [5], [])
    await routes.register("back", 30, [5], [])
    await routes.redis.delete(routes.keys.node_lease("back"))  # lapsed, not listening
    pubsub = await _listen(routes, "n1", "back")
    await pubsub.unsubscribe(routes.keys.node_channel("back"))
    await pubsub.get_message(timeout=10)  # the unsubscribe confirmation
    assert await routes.publish_messages({5: [_message(5, 1)]}) == 1
    assert set(await _received(pubsub, 1)) == {"n1"}
    assert not await routes.redis.sismember(routes.keys.conv_routes(5), "back")  # pruned

    # It comes back: subscribes, takes its lease and registers its routes again. The next
    # batch (within the second the liveness of nodes used to be cached) must reach it.
    await pubsub.subscribe(routes.keys.node_channel("back"))
    await pubsub.get_message(timeout=10)
    await routes.register("back", 30, [5], [])
    await routes.register("new", 30, [5], [])  # and one that was never seen before
    await pubsub.subscribe(routes.keys.node_channel("new"))
    await pubsub.get_message(timeout=10)
    assert await routes.publish_messages({5: [_message(5, 2)]}) == 3
    got = await _received(pubsub, 3)
    assert set(got) == {"n1", "back", "new"}
    assert all(decode_delivery(d).messages == [_message(5, 2)] for d in got.values())
    assert await routes.redis.sismember(routes.keys.conv_routes(5), "back")
    await pubsub.aclose()


async def test_a_delivery_of_more_than_65535_messages_is_encoded_as_before(
    routes: Routes,
) -> None:
    """The script writes the array's header itself: the 32-bit form too."""
    await routes.register("n1", 30, [1, 2], [])
    pubsub = await _listen(routes, "n1")
    by_conv = {1: [_message(1, s, "") for s in range(1, 40_001)]}
    by_conv[2] = [_message(2, s, "") for s in range(1, 30_001)]
    assert await routes.publish_messages(by_conv) == 1
    got = await _received(pubsub, 1)
    assert got["n1"] == encode_delivery(Delivery(messages=by_conv[1] + by_conv[2]))
    await pubsub.aclose()


async def test_a_route_key_that_is_not_a_set_costs_its_conversation_alone(
    routes: Routes,
) -> None:
    """As `nodes_for` takes it (module docstring): no node there, the rest published."""
    await routes.register("n1", 30, [1], [])
    await routes.redis.set(routes.keys.conv_routes(2), "garbage")
    pubsub = await _listen(routes, "n1")
    by_conv = {2: [_message(2, 1)], 1: [_message(1, 1)]}
    assert await routes.publish_messages(by_conv) == 1
    got = await _received(pubsub, 1)
    assert decode_delivery(got["n1"]).messages == [_message(1, 1)]
    assert await routes.redis.get(routes.keys.conv_routes(2)) == b"garbage"
    await pubsub.aclose()
