"""Tail loss between Redis and a gateway: a message published while a node's pub/sub
connection was down reaches the node's subscribers once it is back, although no later
message comes to reveal the gap. Real processes, a private Redis (its ACL is changed) and
the session's broker and shard databases; then the tail check alone on the shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient
from core.settings import Settings
from gateway.protocol.subscription import State, Subscription
from gateway.tailcheck import TailCheck
from storage import conversations, messages
from storage.ids import IdGenerator, shard_of_id
from storage.models import Message, NewMessage
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.faults import OwnRedis
from tests.integration.helpers import create_group, uid
from tests.stack import Stack

pytestmark = pytest.mark.engines


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll until `check()` holds; returns the monotonic time it did."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic()


async def test_a_message_published_while_the_pubsub_was_down_arrives_with_nothing_after_it(
    settings: Settings, pools: ShardPools, http: httpx.AsyncClient, own_redis: OwnRedis
) -> None:
    tag = f"tl{secrets.token_hex(3)}"
    admin = aioredis.Redis.from_url(own_redis.url)
    # Gateway A signs in to Redis as its own user, so that its pub/sub alone can be cut
    # (and kept from coming back) while everything else it does with Redis goes on.
    password = secrets.token_hex(8)
    await admin.execute_command("ACL", "SETUSER", "gwa", "on", f">{password}", "~*", "&*", "+@all")
    node_a = f"tail-a-{tag}"
    common = {
        "AGORA_REDIS_URL": own_redis.url,
        "AGORA_REDIS_PREFIX": tag,
        "AGORA_KAFKA_TOPIC_PREFIX": tag,
    }
    sa = Stack(
        settings,
        extra_env={
            **common,
            "AGORA_REDIS_URL": f"redis://gwa:{password}@127.0.0.1:{own_redis.port}/0",
            "AGORA_NODE_ID": node_a,
        },
    )
    sb = Stack(settings, extra_env=common)
    clients: list[AgoraClient] = []
    try:
        a = sa.gateway("tail-a")
        b = sb.gateway("tail-b")
        sb.fanout("tail-fanout")
        owner, reader, watcher = uid("owner"), uid("reader"), uid("watcher")
        conv = await create_group(http, sb, b, owner, [reader, watcher])
        on_a = await AgoraClient.connect(a.ws_url, sa.token(reader))
        on_b = await AgoraClient.connect(b.ws_url, sb.token(watcher))
        sender = await AgoraClient.connect(b.ws_url, sb.token(owner))
        clients += [on_a, on_b, sender]
        await on_a.sub(conv)
        await on_b.sub(conv)
        await sender.send(conv, "before", cid="before")
        for c in (on_a, on_b):
            assert (await c.next_event("msg", timeout=15))["body"] == "before"

        channel = RedisKeys(tag).node_channel(node_a)

        async def a_listening() -> bool:
            ((_, count),) = await admin.pubsub_numsub(channel)
            return bool(count)

        async def a_deaf() -> bool:
            return not await a_listening()

        # Cut A's pub/sub connection and keep it from subscribing again.
        await admin.execute_command("ACL", "SETUSER", "gwa", "-subscribe")
        killed = await admin.execute_command("CLIENT", "KILL", "USER", "gwa", "TYPE", "pubsub")
        assert killed == 1
        await wait_for(a_deaf, 5, "A's subscription gone")

        # One message, and nothing after it. B's subscriber getting it means the fan-out
        # worker has published it, to A's channel too, where nobody listened.
        await sender.send(conv, "while down", cid="down")
        assert (await on_b.next_event("msg", timeout=15))["body"] == "while down"
        stored = await messages.after(pools, int(conv), 0, 10)
        assert [m.cid for m in stored] == ["before", "down"]
        assert await a_deaf()
        assert on_a.events.empty()

        await admin.execute_command("ACL", "SETUSER", "gwa", "+subscribe")
        back = await wait_for(a_listening, 10, "A subscribed again")
        frame = await on_a.next_event("msg", timeout=5)
        took = time.monotonic() - back
        print(f"\nthe message lost on A's channel reached A {took:.2f}s after it resubscribed")
        assert (frame["body"], frame["seq"]) == ("while down", 2)
        assert took < 2.0
        # Once, in order: nothing else follows (the tail check and any late live copy agree).
        await sender.send(conv, "after", cid="after")
        nxt = await on_a.next_event("msg", timeout=15)
        assert (nxt["body"], nxt["seq"]) == ("after", 3)
    finally:
        for c in clients:
            await c.close()
        await admin.aclose()
        sa.stop_all()
        sb.stop_all()


class _Conn:
    """What the tail check reads of a connection (its subscriptions), and what it gets."""

    def __init__(self) -> None:
        self.subs: dict[int, Subscription] = {}
        self.got: list[int] = []


async def test_the_tail_check_fills_each_subscriber_from_its_own_seq_and_retries_a_dead_shard(
    settings: Settings, pools: ShardPools
) -> None:
    ids = IdGenerator()
    # Three conversations on each physical shard. Their ids are random, so six in a row all
    # landed on one shard 1 time in 32 (a CI run saw it): create until both have three.
    per_shard: dict[int, list[int]] = {0: [], 1: []}
    for i in range(200):
        if all(len(c) == 3 for c in per_shard.values()):
            break
        conv = (await conversations.create_group(pools, ids, uid(f"o{i}"), [], "t")).id
        if len(per_shard[pools.for_id(conv)]) < 3:
            per_shard[pools.for_id(conv)].append(conv)
    convs = per_shard[0] + per_shard[1]
    for conv in convs:  # five messages each, across both physical shards
        async with pools.transaction(pools.for_id(conv)) as conn:
            await messages.append_batch(
                conn,
                [
                    NewMessage(conv, ids.next_id(shard_of_id(conv)), "o", f"c{i}", "x", 1, "text")
                    for i in range(5)
                ],
            )
    assert len(convs) == 6 and {pools.for_id(c) for c in convs} == {0, 1}
    behind, level, recovering = _Conn(), _Conn(), _Conn()
    conv_subs: dict[int, set[Any]] = {}
    for conv in convs:
        behind.subs[conv] = Subscription(conv, last_seq=2, state=State.LIVE)
        level.subs[conv] = Subscription(conv, last_seq=5, state=State.LIVE)
        recovering.subs[conv] = Subscription(conv, last_seq=0, state=State.RECOVERING)
        conv_subs[conv] = {behind, level, recovering}

    def push(conn: Any, out: list[Message]) -> None:
        conn.got += [m.seq for m in out]

    # First against a shard that is down: the check fails, is retried, and fills once the
    # shard answers.
    broken = ShardPools(
        settings.with_overrides(
            shard_dsns=(settings.shard_dsns[0], "postgresql://x@127.0.0.1:1/no")
        )
    )
    check = TailCheck(broken, conv_subs, push, periodic_s=3600)
    task = asyncio.create_task(check.run())
    try:
        check.request()

        async def retried() -> bool:
            return check.checks >= 2

        await wait_for(retried, 10, "a second attempt")
        assert behind.got == []
        check.pools = pools

        async def filled() -> bool:
            return len(behind.got) == 3 * len(convs)

        await wait_for(filled, 10, "the subscriber behind filled")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await broken.close()
    assert behind.got == [3, 4, 5] * len(convs)
    assert level.got == [] and recovering.got == []  # level needs nothing; recovery reads
    assert all(behind.subs[c].last_seq == 5 for c in convs)
    # Checked again with nothing new: nothing is delivered twice.
    assert await check.check() == 0
    assert check.filled == 3 * len(convs)
