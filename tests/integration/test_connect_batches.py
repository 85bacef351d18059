"""The connect path's batched Redis writes (bench/RESULTS.md, issue 14, "Connects"): route
updates and session counts go out as one pipeline per batch written at once on the
pipelined connection of storage/redisline.py (or redis-py's pool where that does not
apply), presence-online writes as one script call per batch. Real Redis; each module's
calls are checked on both transports: the same effects, in the order asked, once; and at
the gateway, a batch that fails fails exactly the connects waiting on it, with 1013, none
of them counted.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient
from core.settings import Settings
from fanout.routing import ROUTE_TTL_S, Routes
from gateway.presence import _ONLINE_MANY
from gateway.usercap import KEY_TTL_S, CountUnknown, UserConnectionCap
from storage.redis_keys import RedisKeys
from storage.redisline import NotSent, RedisLine
from tests.faults import OwnRedis
from tests.integration.helpers import uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


@pytest.fixture(params=["line", "pool"])
async def line(request: Any, settings: Settings) -> AsyncIterator[RedisLine | None]:
    """The transport of the batched writes: the pipelined line, or None (redis-py's pool)."""
    if request.param == "pool":
        yield None
        return
    made = RedisLine(settings.redis_url, 3.0)
    yield made
    made.close()


def fresh_keys() -> RedisKeys:
    return RedisKeys(f"cb{secrets.token_hex(3)}")


async def test_one_route_update_joins_and_leaves_like_the_per_key_commands(
    redis_client: aioredis.Redis, line: RedisLine | None
) -> None:
    keys = fresh_keys()
    routes = Routes(redis_client, keys, line)
    other = Routes(redis_client, keys)
    await other.update("n2", add_convs=[3], add_users=["bob"])
    await routes.update("n1", add_convs=[3], add_users=["bob"])
    await routes.update(
        "n1", add_convs=[1, 2], drop_convs=[3], add_users=["al"], drop_users=["bob"]
    )
    r = redis_client
    assert await r.smembers(keys.conv_routes(1)) == {b"n1"}
    assert await r.smembers(keys.conv_routes(2)) == {b"n1"}
    assert await r.smembers(keys.user_routes("al")) == {b"n1"}
    # Left: only this node's entry goes, another node's stays.
    assert await r.smembers(keys.conv_routes(3)) == {b"n2"}
    assert await r.smembers(keys.user_routes("bob")) == {b"n2"}
    for key in (keys.conv_routes(1), keys.conv_routes(2), keys.user_routes("al")):
        assert ROUTE_TTL_S - 5 <= await r.ttl(key) <= ROUTE_TTL_S
    await routes.update("n1")  # nothing to do
    await routes.update("n1", drop_convs=[1, 2], drop_users=["al"])
    assert not await r.exists(keys.conv_routes(1), keys.conv_routes(2), keys.user_routes("al"))


async def test_connects_counted_together_are_counted_once_each_in_order(
    redis_client: aioredis.Redis, line: RedisLine | None
) -> None:
    """Three sessions of one user and one of another in one batch, cap 2: the first two
    admitted, the third refused (it is the one counted third), each counted once; the
    refused one's count is taken back, so 2 stay."""
    keys = fresh_keys()
    routes = Routes(redis_client, keys)
    cap = UserConnectionCap(redis_client, keys, routes, "n1", 2, line)
    admitted = await asyncio.gather(*(cap.admit(u) for u in ("ann", "ann", "ann", "ben")))
    assert admitted == [True, True, False, True]
    assert (cap._counting.queries, cap._counting.reads) == (1, 4)  # one pipeline for the four
    await cap.releases.idle()
    r = redis_client
    assert await r.hgetall(keys.user_sessions("ann")) == {cap.field.encode(): b"2"}
    assert await r.hgetall(keys.user_sessions("ben")) == {cap.field.encode(): b"1"}
    assert KEY_TTL_S - 5 <= await r.ttl(keys.user_sessions("ann")) <= KEY_TTL_S
    # The next batch sees them: ann is full, ben has room.
    assert await asyncio.gather(cap.admit("ann"), cap.admit("ben")) == [False, True]
    await cap.releases.idle()
    assert await r.hget(keys.user_sessions("ann"), cap.field) == b"2"
    assert await r.hget(keys.user_sessions("ben"), cap.field) == b"2"
    await cap.stop()


async def test_a_command_error_in_a_count_batch_fails_that_connect_only(
    redis_client: aioredis.Redis, line: RedisLine | None
) -> None:
    """A user's hash that is not a hash (WRONGTYPE) fails that user's connect, not the
    others counted in the same pipeline: their HINCRBY ran, so failing their connects
    too left them counted with no decrement ever coming (gateway/ws.py admits a connect
    whose count failed without a release): an over-count for the hash's TTL, a day. The
    connects of the next batch are counted as usual."""
    keys = fresh_keys()
    r = redis_client
    await r.set(keys.user_sessions("broken"), "x")
    cap = UserConnectionCap(r, keys, Routes(r, keys), "n1", 5, line)
    results = await asyncio.gather(cap.admit("broken"), cap.admit("cal"), return_exceptions=True)
    assert (cap._counting.queries, cap._counting.reads) == (1, 2)  # one pipeline for both
    assert isinstance(results[0], aioredis.ResponseError), results
    assert results[1] is True, results
    assert await r.hget(keys.user_sessions("cal"), cap.field) == b"1"
    assert await asyncio.gather(cap.admit("dan"), cap.admit("dan")) == [True, True]
    assert await r.hget(keys.user_sessions("dan"), cap.field) == b"2"
    await cap.stop()


async def test_many_users_online_in_one_call_answers_each_in_order(
    redis_client: aioredis.Redis, line: RedisLine | None
) -> None:
    """_ONLINE_MANY: 1 for a user who was not online, 0 for one who was (so only real
    transitions are announced), every hash and the node's set written, with TTLs."""
    keys = fresh_keys()
    r = redis_client
    await r.hset(keys.presence("was"), mapping={"on": "1", "seen": "5"})
    users = ["new1", "was", "new2"]
    args = [*(keys.presence(u) for u in users), keys.presence_node("n1"), 1234, 600, 30, *users]
    if line is not None:
        flags = await line.execute("EVAL", _ONLINE_MANY, len(users) + 1, *args)
    else:
        flags = await r.eval(_ONLINE_MANY, len(users) + 1, *args)
    assert flags == [1, 0, 1]
    for user in users:
        assert await r.hmget(keys.presence(user), "on", "seen") == [b"1", b"1234"]
        assert 590 <= await r.ttl(keys.presence(user)) <= 600
    assert await r.smembers(keys.presence_node("n1")) == {u.encode() for u in users}
    assert 25 <= await r.ttl(keys.presence_node("n1")) <= 30


# -- at the gateway ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    env = {
        "AGORA_REDIS_TIMEOUT_S": "3",  # shorter than the Redis pause below
        "AGORA_ROUTE_LEASE_S": "12",  # longer than it: the node must not shed
        "AGORA_HANDSHAKES_PER_IP_S": "0",
    }
    s = Stack(settings, extra_env=env)
    try:
        s.gateway("cbatch-g1")
        yield s
    finally:
        s.stop_all()


async def test_connects_whose_registration_batch_fails_get_1013_and_are_not_counted(
    stack: Stack, g1: Proc, settings: Settings, redis_client: Any
) -> None:
    """Redis takes no write for longer than the command timeout while 20 clients connect:
    the registration batch they wait on fails, and each of them gets `hello` then 1013
    ("routing unavailable", docs/protocol.md), none counted; a client connected before
    keeps its session; the clients that connect after it are registered and counted
    exactly once each."""
    r: aioredis.Redis = redis_client
    keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
    early_user, user = uid("cb-early"), uid("cb")
    early = await AgoraClient.connect(g1.ws_url, stack.token(early_user), timeout=10)

    async def sessions(u: str) -> int:
        return sum(int(v) for v in (await r.hgetall(keys.user_sessions(u))).values())

    assert await sessions(early_user) == 1
    await r.execute_command("CLIENT", "PAUSE", 4500, "WRITE")
    try:
        stalled = await asyncio.gather(
            *(AgoraClient.connect(g1.ws_url, stack.token(user), timeout=15) for _ in range(20))
        )
        await asyncio.wait_for(asyncio.gather(*(c.closed.wait() for c in stalled)), 15)
    finally:
        await r.execute_command("CLIENT", "UNPAUSE")
    assert [c.close_code for c in stalled] == [1013] * 20
    assert {c.ws.close_reason for c in stalled} == {"routing unavailable"}
    assert await sessions(user) == 0

    after = await asyncio.gather(
        *(AgoraClient.connect(g1.ws_url, stack.token(user), timeout=10) for _ in range(5))
    )
    assert await sessions(user) == 5
    node = after[0].hello["node"]
    assert await r.sismember(keys.user_routes(user), node)
    assert not early.closed.is_set()
    assert (await early.request({"t": "ping"}))["t"] == "pong"
    assert await sessions(early_user) == 1
    for c in [early, *after, *stalled]:
        await c.close()


async def test_a_count_that_never_left_the_gateway_is_not_taken_for_maybe_counted(
    own_redis: OwnRedis,
) -> None:
    """Redis unreachable when a connect is counted (a restart, a failover; a user's
    second session needs no route write first, so the count is its first Redis call):
    the line cannot connect and writes nothing. That count was not applied, so `admit`
    must not raise CountUnknown, which gateway/ws.py answers with a release when the
    session ends: a decrement of the user's sessions counted before, an under-count of
    one per such connect for as long as they last (the cap then admits more)."""
    keys = fresh_keys()
    r = aioredis.Redis.from_url(own_redis.url)
    line = RedisLine(own_redis.url, 3.0)
    cap = UserConnectionCap(r, keys, Routes(r, keys), "n1", 5, line)
    try:
        assert await cap.admit("ann") is True  # the line is connected
        lost = line.connects
        own_redis.kill()
        async with asyncio.timeout(10):  # the line sees its connection go
            while line._proto is not None and line._proto.lost is None:
                await asyncio.sleep(0.01)
        with pytest.raises(aioredis.RedisError) as raised:
            await cap.admit("ann")
        assert not isinstance(raised.value, CountUnknown), raised.value
        assert isinstance(raised.value, NotSent), raised.value
        assert line.connects == lost  # nothing could have been written
    finally:
        line.close()
        await r.aclose()


async def test_a_count_whose_connection_was_refused_at_auth_is_not_taken_for_maybe_counted(
    own_redis: OwnRedis,
) -> None:
    """Redis refuses the line's AUTH as it connects (a password changed while the gateway
    reconnects, its user disabled): the count was never written, so, as above, `admit`
    must raise NotSent, not CountUnknown (a release for a count that never ran). It was
    taken for a command error of a connected line, maybe applied. Real Redis with a
    password."""
    keys = fresh_keys()
    r = aioredis.Redis.from_url(own_redis.url)
    await r.config_set("requirepass", "right")
    await r.aclose()
    r = aioredis.Redis.from_url(own_redis.url, password="right")
    line = RedisLine(own_redis.url.replace("redis://", "redis://:wrong@"), 3.0)
    cap = UserConnectionCap(r, keys, Routes(r, keys), "n1", 5, line)
    try:
        with pytest.raises(aioredis.RedisError) as raised:
            await cap.admit("ann")
        assert not isinstance(raised.value, CountUnknown), raised.value
        assert isinstance(raised.value, NotSent), raised.value
        assert "WRONGPASS" in str(raised.value)
        assert line.connects == 0 and not await r.exists(keys.user_sessions("ann"))
    finally:
        line.close()
        await r.aclose()
