"""What a gateway node delivers when its storage reads are held up or its deliveries find
no one: a gap fill whose read fails, a subscriber that leaves while the fill reads, a gap
closed live while the fill reads, a `sub` whose storage read fails, a member removed while
its `sub` reads, and deliveries for conversations and users with nobody on the node (stale
routes). Messages are stored by the sequencer and published straight to the node's
channel; reads are held by a lock on the shard's `messages` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from fanout.envelope import Delivery, Score, encode_delivery
from storage import conversations
from storage.ids import IdGenerator
from storage.models import Message
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.integration.helpers import store_texts, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

FILL_QUERY = "%FROM messages%seq > $2 AND seq < $3%"  # storage.messages.between
RECOVER_QUERY = "%LEFT JOIN LATERAL%FROM messages%"  # storage.messages.recover


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def g(stack: Stack) -> Proc:
    return stack.gateway("fill-g")


@dataclass
class Group:
    conv: int
    members: list[str]
    clients: list[AgoraClient]  # one per member, each subscribed to conv
    dsn: str  # conv's shard database

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def group(
    stack: Stack, g: Proc, settings: Settings, pools: ShardPools, ids: IdGenerator, n: int
) -> Group:
    members = [uid("m") for _ in range(n)]
    conv = (await conversations.create_group(pools, ids, members[0], members[1:], "fill")).id
    clients = []
    for user in members:
        client = await AgoraClient.connect(g.ws_url, stack.token(user))
        clients.append(client)
        assert (await client.sub(str(conv)))["seq"] == 0
    return Group(conv, members, clients, settings.shard_dsns[pools.for_id(conv)])


async def publish_delivery(
    redis: aioredis.Redis, settings: Settings, node: str, delivery: Delivery
) -> None:
    channel = RedisKeys(settings.redis_prefix).node_channel(node)
    assert await redis.publish(channel, encode_delivery(delivery)) == 1


async def store(pools: ShardPools, ids: IdGenerator, grp: Group, n: int) -> list[Message]:
    return await store_texts(pools, ids, grp.conv, grp.members[0], n)


async def publish(redis: aioredis.Redis, settings: Settings, node: str, m: Message) -> None:
    await publish_delivery(redis, settings, node, Delivery(messages=[m]))


@contextlib.asynccontextmanager
async def messages_locked(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """`messages` locked ACCESS EXCLUSIVE (every read of it waits) until the block ends."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            yield conn
    finally:
        await conn.close()


async def waiting_read(locker: asyncpg.Connection, query: str, timeout: float = 10) -> int:
    """The pid of the session running `query` (LIKE) once it waits on the lock."""
    deadline = time.monotonic() + timeout
    while True:
        # Inside the locker's transaction pg_stat_activity is read once and kept: drop
        # that snapshot, or a read that starts waiting after the first poll is never seen.
        await locker.execute("SELECT pg_stat_clear_snapshot()")
        pid = await locker.fetchval(
            """SELECT pid FROM pg_stat_activity
               WHERE wait_event_type = 'Lock' AND query LIKE $1 LIMIT 1""",
            query,
        )
        if pid is not None:
            return int(pid)
        assert time.monotonic() < deadline, f"nothing like {query!r} waited on the lock"
        await asyncio.sleep(0.02)


async def wait_log(node: Proc, text: str, after: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log_text()[after:]:
        assert time.monotonic() < deadline, f"{node.name} did not log {text!r}"
        await asyncio.sleep(0.02)


def queued_msgs(client: AgoraClient) -> list[int]:
    """Seqs of the msg frames received and not read yet (other frames are dropped)."""
    seqs = []
    while not client.events.empty():
        frame = client.events.get_nowait()
        if frame.get("t") == "msg":
            seqs.append(frame["seq"])
    return seqs


async def test_a_failed_gap_fill_holds_what_came_after_and_the_next_message_fills_it(
    stack: Stack,
    g: Proc,
    settings: Settings,
    pools: ShardPools,
    ids: IdGenerator,
    redis_client: aioredis.Redis,
) -> None:
    stack.expect_log(r"gap fill of conversation \d+ failed")
    grp = await group(stack, g, settings, pools, ids, 1)
    (client,) = grp.clients
    node = client.hello["node"]
    try:
        stored = await store(pools, ids, grp, 3)
        offset = len(g.log_text())
        async with messages_locked(grp.dsn) as locker:
            await publish(redis_client, settings, node, stored[1])  # seq 1 left out
            # The fill's read waits on the lock; its session is ended: the read fails.
            await locker.fetchval(
                "SELECT pg_terminate_backend($1)", await waiting_read(locker, FILL_QUERY)
            )
            await wait_log(g, f"gap fill of conversation {grp.conv} failed", offset)
        # Seq 2 is held, not delivered ahead of seq 1 (the pong comes after any frame
        # pushed before it).
        await client.ping()
        assert queued_msgs(client) == []
        # The next message finds the gap still open and fills it: all three, in order.
        await publish(redis_client, settings, node, stored[2])
        assert [(await client.next_event("msg"))["seq"] for _ in range(3)] == [1, 2, 3]
    finally:
        await grp.close()


async def test_a_subscriber_gone_while_its_gap_is_read_gets_nothing_of_it(
    stack: Stack,
    g: Proc,
    settings: Settings,
    pools: ShardPools,
    ids: IdGenerator,
    redis_client: aioredis.Redis,
) -> None:
    # Both subscribers see seq 2 without seq 1: one storage read fills both. The first
    # unsubscribes while that read waits; when it returns, only the second gets 1 and 2.
    grp = await group(stack, g, settings, pools, ids, 2)
    gone, stays = grp.clients
    try:
        stored = await store(pools, ids, grp, 2)
        async with messages_locked(grp.dsn) as locker:
            await publish(redis_client, settings, gone.hello["node"], stored[1])
            await waiting_read(locker, FILL_QUERY)
            await gone.unsub(str(grp.conv))
        assert [(await stays.next_event("msg"))["seq"] for _ in range(2)] == [1, 2]
        # Both were served in that one pass (no await between them): `gone` was passed
        # over, and nothing of the conversation is on its way to it.
        await gone.ping()
        assert queued_msgs(gone) == []
    finally:
        await grp.close()


async def test_a_sub_whose_storage_read_fails_is_refused_and_leaves_no_subscription(
    stack: Stack,
    g: Proc,
    settings: Settings,
    pools: ShardPools,
    ids: IdGenerator,
    redis_client: aioredis.Redis,
) -> None:
    # The second member's `sub` reads the conversation's missed messages; that read's
    # session is ended while it waits on the lock. The sub is answered `unavailable`
    # (safe to retry) and the half-made subscription is gone: a message for the
    # conversation reaches the first member (subscribed before) but not the second.
    grp = await group(stack, g, settings, pools, ids, 1)
    (first,) = grp.clients
    second = await AgoraClient.connect(g.ws_url, stack.token(grp.members[0]))
    try:
        async with messages_locked(grp.dsn) as locker:
            sub = asyncio.create_task(second.sub(str(grp.conv), since=0))
            pid = await waiting_read(locker, RECOVER_QUERY)
            await locker.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(ServerError) as refused:
                await sub
        assert refused.value.code == "unavailable"
        (stored,) = await store(pools, ids, grp, 1)
        await publish(redis_client, settings, first.hello["node"], stored)
        assert (await first.next_event("msg"))["seq"] == 1  # dispatched to the node's subs
        await second.ping()
        assert queued_msgs(second) == []
        # The connection is fine: subscribing again works and reads the message.
        assert (await second.sub(str(grp.conv), since=0))["seq"] == 1
        assert (await second.next_event("msg"))["seq"] == 1
    finally:
        await second.close()
        await grp.close()


async def test_deliveries_for_nobody_on_the_node_are_dropped_and_the_rest_delivered(
    stack: Stack,
    g: Proc,
    settings: Settings,
    redis_client: aioredis.Redis,
    pools: ShardPools,
    ids: IdGenerator,
) -> None:
    # A publisher's routes can be stale: they name this node for a conversation or user
    # whose last subscriber here has just gone. Such parts reach no one; the node goes on.
    grp = await group(stack, g, settings, pools, ids, 1)
    (client,) = grp.clients
    other = await AgoraClient.connect(g.ws_url, stack.token(grp.members[0]))
    node = client.hello["node"]
    nobody_conv = grp.conv + 1  # no subscriber of it on this node
    try:
        assert (await other.sub(str(grp.conv)))["seq"] == 0
        (stored,) = await store(pools, ids, grp, 1)
        stale = replace(stored, conv=nobody_conv)
        await publish_delivery(
            redis_client,
            settings,
            node,
            Delivery(
                messages=[stale],
                typing=[(nobody_conv, "x")],
                scores=[Score(post=1, thread=nobody_conv, score=1, up=1, down=0)],
                user_frames=[(uid("nobody"), {"t": "notify", "n": {"id": "1"}})],
                presence=[([nobody_conv], {"t": "presence", "user": "x", "online": True})],
            ),
        )
        score = Score(post=stored.id, thread=grp.conv, score=2, up=2, down=0)
        await publish_delivery(redis_client, settings, node, Delivery(scores=[score]))
        # Both connections get the score (one encoding for both) and nothing before it.
        for c in (client, other):
            assert await c.next_event(timeout=10) == {
                "t": "score",
                "post": str(stored.id),
                "score": 2,
                "up": 2,
                "down": 0,
            }
            await c.ping()
            assert queued_msgs(c) == []
    finally:
        await other.close()
        await grp.close()


async def test_a_gap_closed_live_while_its_fill_reads_is_delivered_in_order_at_once(
    stack: Stack,
    g: Proc,
    settings: Settings,
    pools: ShardPools,
    ids: IdGenerator,
    redis_client: aioredis.Redis,
) -> None:
    # Seq 2 arrives before seq 1 (published out of order): 2 is held and a fill starts.
    # Seq 1 arrives live while the fill's read waits: 1 and 2 go out together at once,
    # in order, without waiting for storage; the fill, when it returns, adds nothing.
    grp = await group(stack, g, settings, pools, ids, 1)
    (client,) = grp.clients
    node = client.hello["node"]
    try:
        stored = await store(pools, ids, grp, 3)
        async with messages_locked(grp.dsn) as locker:
            await publish(redis_client, settings, node, stored[1])
            await waiting_read(locker, FILL_QUERY)
            await publish(redis_client, settings, node, stored[0])
            assert [(await client.next_event("msg"))["seq"] for _ in range(2)] == [1, 2]
        await publish(redis_client, settings, node, stored[2])
        assert (await client.next_event("msg"))["seq"] == 3
    finally:
        await grp.close()


async def test_a_member_removed_while_its_sub_reads_storage_is_told_and_refused(
    stack: Stack,
    g: Proc,
    settings: Settings,
    pools: ShardPools,
    ids: IdGenerator,
    http: httpx.AsyncClient,
) -> None:
    # The member's `sub` reads the missed messages (held by the lock) when the owner
    # removes it: the removal ends the subscription being made (`unsubbed`), the `sub`
    # then returns without releasing anything it read, and is refused.
    owner, removed = uid("o"), uid("x")
    conv = (await conversations.create_group(pools, ids, owner, [removed], "fill")).id
    grp = Group(conv, [owner, removed], [], settings.shard_dsns[pools.for_id(conv)])
    await store(pools, ids, grp, 2)
    client = await AgoraClient.connect(g.ws_url, stack.token(removed))
    try:
        async with messages_locked(grp.dsn) as locker:
            sub = asyncio.create_task(client.sub(str(conv), since=0))
            await waiting_read(locker, RECOVER_QUERY)
            r = await http.delete(
                f"{g.http_url}/v1/conversations/{conv}/members/{removed}",
                headers={"Authorization": f"Bearer {stack.token(owner)}"},
            )
            assert r.status_code == 204, r.text
            unsubbed = await client.next_event("unsubbed", timeout=10)
            assert unsubbed == {"t": "unsubbed", "conv": str(conv), "reason": "removed"}
        with pytest.raises(ServerError) as refused:
            await sub
        assert refused.value.code == "not_found"
        await client.ping()
        assert queued_msgs(client) == []  # seqs 1 and 2 were read, none was delivered
    finally:
        await client.close()
