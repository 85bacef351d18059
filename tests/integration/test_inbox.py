"""Mentions and the notification inbox end to end: two gateways, two fan-out workers,
the real engines. Mentions and replies reach the inbox exactly once and a live `notify`
frame; a direct message to someone offline waits in their inbox."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agora_client import AgoraClient
from core.settings import Settings
from storage import messages
from storage.ids import IdGenerator, shard_of_id
from storage.models import NewMessage
from storage.pools import ShardPools
from tests.integration.helpers import (
    auth,
    collect,
    collect_each,
    create_direct,
    create_group,
    uid,
)
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    try:
        s.gateway("nb-g1")
        s.gateway("nb-g2")
        s.fanout("nb-f1")
        s.fanout("nb-f2")
        yield s
    finally:
        s.stop_all()


async def inbox(
    http: httpx.AsyncClient, stack: Stack, node: Proc, user: str, query: str = ""
) -> dict[str, Any]:
    r = await http.get(f"{node.http_url}/v1/notifications{query}", headers=auth(stack, user))
    assert r.status_code == 200, r.text
    page: dict[str, Any] = r.json()
    return page


async def inbox_until(
    http: httpx.AsyncClient, stack: Stack, node: Proc, user: str, count: int
) -> dict[str, Any]:
    for _ in range(300):  # written by a fan-out worker: poll until it is there
        page = await inbox(http, stack, node, user, "?limit=100")
        if len(page["items"]) >= count:
            return page
        await asyncio.sleep(0.05)
    raise AssertionError(f"{user} has {len(page['items'])} notifications, not {count}")


async def test_mentions_and_replies_notify_live_and_land_in_the_inbox_once(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b, c = uid("a"), uid("b"), uid("c")
    outsider = uid("z")
    conv = await create_group(http, stack, g1, a, [b, c])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    cc = await AgoraClient.connect(g2.ws_url, stack.token(c))
    for x in (ca, cb, cc):  # registered (a pong): `notify` goes only where a route says
        assert (await x.ping())["t"] == "pong"
    watcher = await AgoraClient.connect(g1.ws_url, stack.token(c))  # counts what is stored
    await watcher.sub(conv)
    first = await ca.send(conv, f"hi @{b} and @{outsider}, me @{a}.")
    got = await cb.next_event("notify")
    assert got["n"]["kind"] == "mention" and got["n"]["from"] == a
    assert got["n"]["message"] == first["id"] and got["n"]["conv"] == conv
    # c replies to a and mentions a too: one notification for a, a reply.
    answer = await cc.send(conv, f"@{a}: sure", reply_to=first["id"])
    got = await ca.next_event("notify")
    assert (got["n"]["kind"], got["n"]["message"]) == ("reply", answer["id"])
    await ca.send(conv, "replying to myself notifies nobody", reply_to=first["id"])
    await cb.send(conv, f"@{b} is me: nothing either")
    assert len(await collect(watcher, conv, 4, 15)) == 4  # all four stored
    page_a = await inbox(http, stack, g2, a)
    page_b = await inbox(http, stack, g1, b)
    assert [(n["kind"], n["from"]) for n in page_a["items"]] == [("reply", c)]
    assert [(n["kind"], n["from"]) for n in page_b["items"]] == [("mention", a)]
    assert (await inbox(http, stack, g1, outsider))["items"] == []  # not a member
    assert (await inbox(http, stack, g1, c))["items"] == []
    for client in (ca, cb, cc, watcher):
        await client.close()


async def test_a_dm_or_mention_to_an_offline_user_waits_in_the_inbox(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, away = uid("a"), uid("away")
    dm = await create_direct(http, stack, g1, a, away)
    group = await create_group(http, stack, g1, a, [away])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    await ca.sub(dm)
    await ca.sub(group)
    sent = [await ca.send(dm, f"are you there {i}?") for i in range(3)]
    mention = await ca.send(group, f"@{away} see this")
    # Two conversations, two partitions, maybe two workers: their frames interleave.
    got = await collect_each(ca, {dm: 3, group: 1}, 15)
    assert (len(got[dm]), len(got[group])) == (3, 1)

    # Back online: everything is in the inbox, newest first, and pages without repeats.
    page = await inbox_until(http, stack, g2, away, 4)
    ids = [n["id"] for n in page["items"]]
    kinds = {mention["id"]: "mention", **{s["id"]: "dm" for s in sent}}
    # Newest first is by id, time-ordered to the millisecond: the mention, sent after
    # the last dm was acked, can share its millisecond, and the shard in the id decides.
    assert ids == sorted(kinds, key=int, reverse=True)
    assert [i for i in ids if kinds[i] == "dm"] == [s["id"] for s in reversed(sent)]
    assert [n["kind"] for n in page["items"]] == [kinds[i] for i in ids]
    assert page["unread"] == 4
    seen: list[str] = []
    cursor = ""
    for _ in range(5):
        p = await inbox(http, stack, g1, away, f"?limit=2{cursor}")
        seen += [n["id"] for n in p["items"]]
        if p["next"] is None:
            break
        cursor = f"&cursor={p['next']}"
    assert seen == ids

    # Online now: a direct message notifies nobody's inbox (it is read live).
    cw = await AgoraClient.connect(g2.ws_url, stack.token(away))
    await cw.sub(dm)
    live = await ca.send(dm, "now you are here")
    assert len(await collect(cw, dm, 1, 15)) == 1
    # The worker decides on that message's inbox entry after delivering it. A message of
    # the same conversation sent now is in a later batch of the same partition, handled
    # after that decision; this one names `away`, so its mention is written in its own
    # sequencing transaction: once it is in the inbox, the live one's fate is known.
    marker = await ca.send(dm, f"@{away} are you reading?")
    page = await inbox_until(http, stack, g1, away, 5)
    ids = [marker["id"], *ids]
    assert [n["id"] for n in page["items"]] == ids and live["id"] not in ids
    assert page["items"][0]["kind"] == "mention"

    r = await http.post(
        f"{g1.http_url}/v1/notifications/read", json={"ids": ids[:1]}, headers=auth(stack, away)
    )
    assert r.json() == {"marked": 1}
    unread = await inbox(http, stack, g1, away, "?unread=true")
    assert [n["id"] for n in unread["items"]] == ids[1:] and unread["unread"] == 4
    r = await http.post(f"{g1.http_url}/v1/notifications/read", json={}, headers=auth(stack, away))
    assert r.json() == {"marked": 4}
    assert (await inbox(http, stack, g1, away))["unread"] == 0
    for bad in ({"ids": "x"}, {"ids": [1]}, {"ids": ["nope"]}, {"ids": None}):
        r = await http.post(
            f"{g1.http_url}/v1/notifications/read", json=bad, headers=auth(stack, away)
        )
        assert r.status_code == 422, bad
    r = await http.get(f"{g1.http_url}/v1/notifications?unread=maybe", headers=auth(stack, away))
    assert r.status_code == 400
    await ca.close()
    await cw.close()


async def test_a_redelivered_mention_is_not_notified_twice(
    pools: ShardPools, ids: IdGenerator, http: httpx.AsyncClient, stack: Stack, g1: Proc
) -> None:
    a, b = uid("a"), uid("b")
    conv = int(await create_group(http, stack, g1, a, [b]))
    m = NewMessage(conv, ids.next_id(shard_of_id(conv)), a, "m1", f"@{b} hi", 1, "text")
    for _ in range(2):  # a Kafka redelivery: the second finds the message stored
        async with pools.transaction(pools.for_id(conv)) as conn:
            await messages.append_batch(conn, [m])
    async with pools.connection(pools.for_id(conv)) as conn:
        rows = await conn.fetchval("SELECT count(*) FROM notifications WHERE user_id = $1", b)
    assert rows == 1


async def test_when_redis_cannot_say_who_is_online_every_dm_is_kept(
    pools: ShardPools, ids: IdGenerator, http: httpx.AsyncClient, stack: Stack, g1: Proc
) -> None:
    """The fan-out worker asks Redis who is online before keeping a direct message for an
    offline recipient; with Redis unreachable it keeps it anyway, then fails the batch
    (which is handled again: nothing is lost, nothing is kept twice)."""
    import redis.asyncio as aioredis

    from fanout.notify import notify
    from fanout.routing import Routes
    from storage.models import Message
    from storage.redis_keys import RedisKeys

    a, b = uid("a"), uid("b")
    conv = int(await create_direct(http, stack, g1, a, b))
    m = Message(conv, ids.next_id(shard_of_id(conv)), 1, a, "hello", 1, "c", "text", dm_to=b)
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        for _ in range(2):  # the batch handled again: still one entry
            with pytest.raises((aioredis.RedisError, OSError)):
                await notify(Routes(dead, RedisKeys("x")), pools, [m])
    finally:
        await dead.aclose()
    page = await inbox(http, stack, g1, b)
    assert [(n["kind"], n["message"]) for n in page["items"]] == [("dm", str(m.id))]


async def test_a_dm_stored_by_a_worker_that_died_before_its_inbox_entry_gets_it_on_redelivery(
    settings: Settings,
    pools: ShardPools,
    ids: IdGenerator,
    http: httpx.AsyncClient,
    stack: Stack,
    g1: Proc,
) -> None:
    """A worker commits a direct message, then dies (or its Redis fails) before writing the
    offline recipient's inbox entry, which comes after the commit. The record is delivered
    again (Kafka redelivery) to the stack's real workers: they find the message stored and
    must still write the entry."""
    from aiokafka import AIOKafkaProducer

    from fanout.envelope import encode_new_message
    from fanout.kafka import messages_topic

    a, b = uid("a"), uid("b")
    conv = int(await create_direct(http, stack, g1, a, b))
    m = NewMessage(conv, ids.next_id(shard_of_id(conv)), a, "died", "are you there", 1, "text")
    async with pools.transaction(pools.for_id(conv)) as conn:  # the first attempt's commit
        stored, _, _ = await messages.append_batch(conn, [m])
    assert [s.dm_to for s in stored] == [b]
    assert (await inbox(http, stack, g1, b))["items"] == []  # ... and then it died

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            messages_topic(settings), encode_new_message(m), key=str(conv).encode()
        )
    finally:
        await producer.stop()
    page = await inbox_until(http, stack, g1, b, 1)
    assert [(n["kind"], n["message"]) for n in page["items"]] == [("dm", str(m.id))]
    history = await messages.after(pools, conv, 0, 10)
    assert [x.id for x in history] == [m.id]  # stored once, under its first seq
