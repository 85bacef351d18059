"""A retried `cid` gets the id of the stored message, always (issue 11 point 4, issue 18
point 3): Redis flushed between a send and its retry, the record gone after the ack (a
gateway that died before marking it), a retry after the idempotency window, a retry while
the first copy is still in Kafka and Redis lost the record. And the branches around them:
a cid reused in another conversation, a pending record waited on and its timeout, Redis
failing while the outcome is recorded.

Real processes: two gateways, one fan-out worker, a private Redis and a private broker
(this module flushes, kills and pauses them).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from devstack import services
from storage import messages
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.engines import free_port
from tests.faults import OwnRedis
from tests.integration.helpers import create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

WINDOW_S = 60  # the module's gateways; a third one runs with a 2 s window
SHORT_WINDOW_S = 2


@dataclass
class Env:
    stack: Stack
    g1: Proc
    g2: Proc
    short: Proc  # a gateway whose idempotency window is SHORT_WINDOW_S
    fanout: Proc
    redis: OwnRedis
    broker: subprocess.Popen[bytes]
    keys: RedisKeys
    settings: Settings


@pytest.fixture(scope="module")
def env(settings: Settings) -> Iterator[Env]:
    redis = OwnRedis()
    redis.start()
    port = free_port()
    broker = services.start_tansu("127.0.0.1", port, services.Path(".agora/test/tansu-idem.log"))
    common = {
        "AGORA_REDIS_URL": redis.url,
        "AGORA_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "AGORA_ROUTE_LEASE_S": "3",
    }
    s = Stack(settings, extra_env={**common, "AGORA_IDEMPOTENCY_WINDOW_S": str(WINDOW_S)})
    short = Stack(settings, extra_env={**common, "AGORA_IDEMPOTENCY_WINDOW_S": "2"})
    for stack in (s, short):  # aiokafka logs at ERROR each attempt to reach a paused broker
        stack.expect_log(r"^aiokafka: Unable (connect to node|to update metadata)")
    try:
        g1, g2 = s.gateway("idem-g1"), s.gateway("idem-g2")
        g3 = short.gateway("idem-g3")
        fanout = s.fanout("idem-f")
        yield Env(s, g1, g2, g3, fanout, redis, broker, RedisKeys(settings.redis_prefix), settings)
    finally:
        for p in (s, short):
            for proc in p.procs:
                if proc.alive():
                    proc.signal_all(signal.SIGCONT)
            p.stop_all()
        broker.send_signal(signal.SIGCONT)
        broker.kill()
        broker.wait(10)
        redis.kill()


@pytest.fixture
async def r(env: Env) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(env.redis.url)
    yield client
    await client.aclose()


async def wait_for(what: str, check: Any, seconds: float = 15) -> Any:
    """Poll `check()` (async) until it returns something truthy."""
    deadline = time.monotonic() + seconds
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def stored(pools: ShardPools, conv: str, user: str, cid: str) -> tuple[int, int] | None:
    return await messages.stored_id(pools, int(conv), user, cid)


async def rows(pools: ShardPools, conv: str, cid: str) -> list[int]:
    return [m.id for m in await messages.after(pools, int(conv), 0, 1000) if m.cid == cid]


async def retry_until_acked(client: AgoraClient, conv: str, body: str, cid: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            ack = await client.send(conv, body, cid=cid)
            return str(ack["id"])
        except ServerError as exc:
            assert exc.code == "unavailable", exc.frame
            assert time.monotonic() < deadline, "no ack within 30 s"
            await asyncio.sleep(0.2)


async def acked_at_once(client: AgoraClient, conv: str, prefix: str) -> str:
    """Sends with new cids until one is acked at its first attempt; its cid. Then the
    worker runs, and this client's gateway knows every earlier record of the
    conversation's (partition, shard) stored (gateway/idempotency.py, EpochWatch): a send
    there is acked when the broker has it, without waiting for its copy to be stored. A
    send acked only at a retry proves nothing (its copy may be the first attempt's): while
    the module's Redis epoch is young, a worker slower than the gateway's settle wait (one
    starting, or starved of CPU) leaves the pair unproven."""
    deadline = time.monotonic() + 30
    for k in itertools.count():
        cid = f"{prefix}-{k}"
        try:
            await client.send(conv, "warm-up", cid=cid)
            return cid
        except ServerError as exc:
            assert exc.code == "unavailable", exc.frame
            assert time.monotonic() < deadline, "no send acked at its first attempt in 30 s"
    raise AssertionError("unreachable")


async def sender(env: Env, http: httpx.AsyncClient) -> tuple[str, str, AgoraClient, AgoraClient]:
    """A user with a fresh group, connected to both gateways."""
    user = uid("idem")
    conv = await create_group(http, env.stack, env.g1, user, [])
    c1 = await AgoraClient.connect(env.g1.ws_url, env.stack.token(user))
    c2 = await AgoraClient.connect(env.g2.ws_url, env.stack.token(user))
    return user, conv, c1, c2


async def test_redis_flushed_between_send_and_retry(
    env: Env, http: httpx.AsyncClient, pools: ShardPools, r: aioredis.Redis
) -> None:
    user, conv, c1, c2 = await sender(env, http)
    first = await retry_until_acked(c1, conv, "hello", "flush-1")
    await wait_for("the message stored", lambda: stored(pools, conv, user, "flush-1"))
    await r.flushdb()
    again = await retry_until_acked(c2, conv, "hello", "flush-1")
    print(f"after FLUSHDB: first {first}, retry {again}")
    assert again == first
    assert await rows(pools, conv, "flush-1") == [int(first)]
    await c1.close()
    await c2.close()


async def test_record_gone_after_the_ack(
    env: Env, http: httpx.AsyncClient, pools: ShardPools, r: aioredis.Redis
) -> None:
    """A gateway that died between the broker's ack and marking its record leaves a
    record that expires: the retry then finds none."""
    user, conv, c1, c2 = await sender(env, http)
    first = await retry_until_acked(c1, conv, "hello", "gone-1")
    await wait_for("the message stored", lambda: stored(pools, conv, user, "gone-1"))
    assert await r.delete(env.keys.idempotency(user, "gone-1")) == 1
    again = await retry_until_acked(c2, conv, "hello", "gone-1")
    assert again == first
    # The record names the stored message again: the next retry is answered by Redis.
    assert (await r.get(env.keys.idempotency(user, "gone-1"))) is not None
    assert await retry_until_acked(c1, conv, "hello", "gone-1") == first
    assert await rows(pools, conv, "gone-1") == [int(first)]
    await c1.close()
    await c2.close()


async def test_retry_after_the_window_is_answered_from_the_shard(
    env: Env, http: httpx.AsyncClient, pools: ShardPools, r: aioredis.Redis
) -> None:
    user = uid("idem")
    conv = await create_group(http, env.stack, env.short, user, [])
    c = await AgoraClient.connect(env.short.ws_url, env.stack.token(user))
    key = env.keys.idempotency(user, "late-1")
    first = await retry_until_acked(c, conv, "hello", "late-1")
    ttl = await r.ttl(key)
    print(f"record TTL after the ack: {ttl} s (window {SHORT_WINDOW_S} s)")
    assert 0 < ttl <= SHORT_WINDOW_S
    await wait_for("the message stored", lambda: stored(pools, conv, user, "late-1"))

    async def expired() -> bool:
        return not await r.exists(key)

    await wait_for("the record to expire", expired, SHORT_WINDOW_S + 5)
    again = await retry_until_acked(c, conv, "a different body", "late-1")
    assert again == first
    await asyncio.sleep(0.5)  # the retry's own copy reaches the worker and is dropped
    got = await rows(pools, conv, "late-1")
    assert got == [int(first)]
    stored_body = [m.body for m in await messages.after(pools, int(conv), 0, 10)]
    assert stored_body == ["hello"]
    await c.close()


async def test_retry_while_the_first_copy_is_in_flight_and_redis_lost_it(
    env: Env, http: httpx.AsyncClient, pools: ShardPools, r: aioredis.Redis
) -> None:
    user, conv, c1, c2 = await sender(env, http)
    # The worker runs, and the first copy's send below is acked while it is stopped.
    warm = await acked_at_once(c1, conv, "fl-0")
    await wait_for("the warm-up stored", lambda: stored(pools, conv, user, warm))
    env.fanout.signal_all(signal.SIGSTOP)
    try:
        first = await retry_until_acked(c1, conv, "hello", "fl-1")
        assert await stored(pools, conv, user, "fl-1") is None  # still in Kafka
        await r.flushdb()
        # With the worker stopped, the retry cannot learn which copy will be stored: it
        # must not answer with an id minted now. It answers `unavailable` (retry later).
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            await c2.send(conv, "hello", cid="fl-1")
        print(f"retry while not stored: {info.value.code} after {time.monotonic() - started:.1f}s")
        assert info.value.code == "unavailable"
        # Once more, and the worker resumes while this retry waits for the copy.
        retry = asyncio.create_task(c2.send(conv, "hello", cid="fl-1"))
        key = env.keys.idempotency(user, "fl-1")

        async def claimed() -> bool:
            v = await r.get(key)
            return v is not None and v.startswith(b"p|")

        await wait_for("the retry's claim", claimed)
    finally:
        env.fanout.signal_all(signal.SIGCONT)
    again = str((await retry)["id"])
    print(f"in flight + FLUSHDB: first {first}, retry {again}")
    assert again == first
    await wait_for("the retry's copy dropped", lambda: stored(pools, conv, user, "fl-1"))
    assert await rows(pools, conv, "fl-1") == [int(first)]
    await c1.close()
    await c2.close()


async def test_cid_reused_in_another_conversation_is_a_conflict(
    env: Env, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    user, conv, c1, c2 = await sender(env, http)
    other = await create_group(http, env.stack, env.g1, user, [])
    await retry_until_acked(c1, conv, "hello", "cc-1")
    with pytest.raises(ServerError) as info:
        await c2.send(other, "hello", cid="cc-1")
    assert info.value.code == "conflict"
    await asyncio.sleep(0.3)
    assert await rows(pools, other, "cc-1") == []
    await c1.close()
    await c2.close()


async def evalsha_calls(r: aioredis.Redis) -> int:
    stats = await r.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0)) if isinstance(entry, dict) else 0


async def test_a_pending_record_is_waited_on_then_answered(
    env: Env, http: httpx.AsyncClient, r: aioredis.Redis
) -> None:
    """Another attempt with this cid is in flight (its record is pending): the retry waits
    for its outcome and answers with its id; with no outcome in time, `unavailable`."""
    user, conv, c1, c2 = await sender(env, http)
    await retry_until_acked(c1, conv, "warm-up", "pw-0")
    ms = int(time.time() * 1000)
    key = env.keys.idempotency(user, "pw-1")
    await r.set(key, f"p|{ms}|77|{conv}", ex=30)
    before = await evalsha_calls(r)
    waiting = asyncio.create_task(c2.send(conv, "hello", cid="pw-1"))

    async def polling() -> bool:
        return await evalsha_calls(r) >= before + 3  # it claims again and again

    await wait_for("the retry to poll the pending record", polling)
    assert not waiting.done()
    await r.set(key, f"a|{ms}|77|{conv}", ex=30)
    ack = await waiting
    expected = messages_id(ms, int(conv), 77)
    assert ack["id"] == str(expected)

    await r.set(env.keys.idempotency(user, "pw-2"), f"p|{ms}|78|{conv}", ex=30)
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        await c2.send(conv, "hello", cid="pw-2")
    took = time.monotonic() - started
    print(f"pending never resolved: {info.value.code} after {took:.1f}s")
    assert info.value.code == "unavailable" and took >= 2.5
    await c1.close()
    await c2.close()


async def test_a_stale_pending_record_is_taken_over_with_its_id(
    env: Env, http: httpx.AsyncClient, r: aioredis.Redis, pools: ShardPools
) -> None:
    """A pending record older than PENDING_TAKEOVER_MS (its gateway died, or lost Redis,
    before marking it): a retry produces the record's own id at once instead of waiting
    for the record to expire."""
    from gateway.send import PENDING_TAKEOVER_MS

    user, conv, c1, c2 = await sender(env, http)
    await retry_until_acked(c1, conv, "warm-up", "st-0")
    ms = int(time.time() * 1000) - PENDING_TAKEOVER_MS - 1000
    await r.set(env.keys.idempotency(user, "st-1"), f"p|{ms}|79|{conv}", ex=30)
    started = time.monotonic()
    ack = await c2.send(conv, "hello", cid="st-1")
    assert ack["id"] == str(messages_id(ms, int(conv), 79))
    assert time.monotonic() - started < 2.5  # not the pending wait
    assert await wait_for("the stored row", lambda: rows(pools, conv, "st-1")) == [int(ack["id"])]
    # A younger pending record is still waited on (the test above): only stale ones move.
    await c1.close()
    await c2.close()


def messages_id(ms: int, conv: int, n: int) -> int:
    from storage.ids import SEQ_MASK, compose, shard_of_id

    return compose(ms, shard_of_id(conv), n & SEQ_MASK)


async def test_redis_failing_while_the_outcome_is_recorded(
    env: Env, http: httpx.AsyncClient, pools: ShardPools, r: aioredis.Redis
) -> None:
    """The broker acks after Redis died: the send is acked all the same (the message is
    in Kafka); its record is lost with Redis, and the retry still gets the same id."""
    user, conv, c1, c2 = await sender(env, http)
    await retry_until_acked(c1, conv, "warm-up", "rf-0")
    await wait_for("the warm-up stored", lambda: stored(pools, conv, user, "rf-0"))
    key = env.keys.idempotency(user, "rf-1")
    env.broker.send_signal(signal.SIGSTOP)
    try:
        sending = asyncio.create_task(c1.send(conv, "hello", cid="rf-1"))

        async def claimed() -> bool:
            return bool(await r.exists(key))

        await wait_for("the claim", claimed)
        env.redis.kill()
    finally:
        env.broker.send_signal(signal.SIGCONT)
    ack = await sending
    first = str(ack["id"])
    print(f"acked with Redis down at marking time: {first}")
    env.redis.start()  # empty: the record and the epoch are gone
    await wait_for("the message stored", lambda: stored(pools, conv, user, "rf-1"), 30)
    again = await retry_until_acked(c2, conv, "hello", "rf-1")
    assert again == first
    assert await rows(pools, conv, "rf-1") == [int(first)]
    await c1.close()
    await c2.close()


async def test_a_retry_of_a_stored_message_is_answered_while_the_broker_is_down(
    env: Env, http: httpx.AsyncClient, pools: ShardPools, r: aioredis.Redis
) -> None:
    """Redis forgot the cid and the broker does not answer: the shard still has the
    message, so the retry gets its id rather than `unavailable`."""
    user, conv, c1, c2 = await sender(env, http)
    first = await retry_until_acked(c1, conv, "hello", "bd-1")
    await wait_for("the message stored", lambda: stored(pools, conv, user, "bd-1"))
    assert await r.delete(env.keys.idempotency(user, "bd-1")) == 1
    env.broker.send_signal(signal.SIGSTOP)
    try:
        ack = await c2.send(conv, "hello", cid="bd-1")
    finally:
        env.broker.send_signal(signal.SIGCONT)
    assert str(ack["id"]) == first
    # And a new cid in the same state is refused, never acked.
    env.broker.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(ServerError) as info:
            await c2.send(conv, "new", cid="bd-2")
    finally:
        env.broker.send_signal(signal.SIGCONT)
    assert info.value.code == "unavailable"
    await c1.close()
    await c2.close()
