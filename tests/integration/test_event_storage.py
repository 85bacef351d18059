"""Where edits, deletes and reactions take effect: `append_batch` on a real shard.

The sequencer's own checks, under the races the gateway's cannot see: events in one batch
with their target, redeliveries after the state moved on, two transactions at once (a
zombie worker after a rebalance)."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

import pytest

from fanout.sequencer import sequence
from storage import conversations, events, messages
from storage.ids import IdGenerator, shard_of_id
from storage.models import Message, NewMessage
from storage.pools import ShardPools

pytestmark = pytest.mark.engines


def tag() -> str:
    return secrets.token_hex(4)


class Maker:
    def __init__(self, conv: int, ids: IdGenerator) -> None:
        self.conv, self.ids, self.n = conv, ids, 0

    def __call__(
        self, sender: str, kind: str = "text", body: str = "hello", ref: int | None = None
    ) -> NewMessage:
        self.n += 1
        return NewMessage(
            conv=self.conv,
            id=self.ids.next_id(shard_of_id(self.conv)),
            sender=sender,
            cid=f"c{self.n}",
            body=body,
            ts=time.time_ns() // 1_000_000,
            kind=kind,
            ref=ref,
        )


async def append(pools: ShardPools, conv: int, batch: list[NewMessage]) -> list[Message]:
    async with pools.transaction(pools.for_id(conv)) as conn:
        stored, _, _ = await messages.append_batch(conn, batch)
    return stored


async def counts(pools: ShardPools, conv: int, mid: int) -> dict[str, int]:
    async with pools.connection(pools.for_id(conv)) as conn:
        got = await events.reaction_counts(conn, [mid], "nobody")
    return got.get(mid, ({}, []))[0]


async def test_a_refused_reaction_stays_refused_when_redelivered(
    pools: ShardPools, ids: IdGenerator
) -> None:
    a, b = f"a{tag()}", f"b{tag()}"
    conv = await conversations.create_group(pools, ids, a, [b], "t")
    make = Maker(conv.id, ids)
    target = make(a)
    await append(pools, conv.id, [target])
    react = make(b, "react", "👍", target.id)
    twice = make(b, "react", "👍", target.id)  # changes nothing: refused, no seq
    stored = await append(pools, conv.id, [react, twice])
    assert [(m.seq, m.kind) for m in stored] == [(2, "react")]
    assert await counts(pools, conv.id, target.id) == {"👍": 1}
    undo = make(b, "unreact", "👍", target.id)
    assert [m.seq for m in await append(pools, conv.id, [undo])] == [3]
    # Kafka delivers `twice` again: now it would change something, but it was refused
    # once and must stay refused (or a replay of old records would rewrite the present).
    assert await append(pools, conv.id, [twice]) == []
    assert await counts(pools, conv.id, target.id) == {}
    assert await messages.latest_seq(pools, conv.id) == 3


async def test_events_with_their_target_in_one_batch(pools: ShardPools, ids: IdGenerator) -> None:
    a, b, c = f"a{tag()}", f"b{tag()}", f"c{tag()}"
    conv = await conversations.create_group(pools, ids, a, [b, c], "t")
    make = Maker(conv.id, ids)
    m = make(a, body="first text")
    batch = [
        m,
        make(b, "edit", "not yours", m.id),  # refused: not the sender
        make(a, "edit", "second text", m.id),
        make(b, "react", "🎉", m.id),
        make(a, "delete", "", m.id),
        make(c, "react", "🎉", m.id),  # refused: deleted
        make(a, "edit", "third text", m.id),  # refused: deleted
    ]
    stored = await append(pools, conv.id, batch)
    assert [m.kind for m in stored] == ["text", "edit", "react", "delete"]
    assert [m.seq for m in stored] == [1, 2, 3, 4]
    first = stored[0]
    assert (first.body, first.edited, first.deleted) == ("", True, True)
    assert stored[1].body == ""  # the edit's text is gone with the message
    replay = await messages.after(pools, conv.id, 0, 10)
    assert replay == stored  # what was delivered is what is stored
    async with pools.connection(pools.for_id(conv.id)) as conn:
        texts = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE conv_id = $1 AND body LIKE '%text%'", conv.id
        )
    assert texts == 0
    assert await counts(pools, conv.id, m.id) == {}


async def test_edit_of_a_stored_message_then_delete_wipes_earlier_edits(
    pools: ShardPools, ids: IdGenerator
) -> None:
    a = f"a{tag()}"
    conv = await conversations.create_group(pools, ids, a, [], "t")
    make = Maker(conv.id, ids)
    m = make(a, body="v1")
    other = make(a, body="keep me")
    await append(pools, conv.id, [m, other])
    await append(pools, conv.id, [make(a, "edit", "v2", m.id)])
    await append(pools, conv.id, [make(a, "edit", "v3", other.id)])
    page = await events.current_page(pools, conv.id, None, 10, a)
    assert {x.body for x in page.messages} == {"v2", "v3"} and page.last_seq == 4
    await append(pools, conv.id, [make(a, "delete", "", m.id)])
    bodies = [(x.kind, x.body, x.ref) for x in await messages.after(pools, conv.id, 0, 10)]
    assert bodies == [
        ("text", "", None),
        ("text", "v3", None),
        ("edit", "", m.id),
        ("edit", "v3", other.id),
        ("delete", "", m.id),
    ]


async def test_two_transactions_with_the_same_events_count_once(
    pools: ShardPools, ids: IdGenerator
) -> None:
    """A zombie worker and the partition's new owner store the same records at once. The
    second waits on the conversation's lock while the first holds it; when it gets it, the
    records are there: nothing is sequenced twice and every count moved once."""
    owner = f"o{tag()}"
    users = [f"u{i}{tag()}" for i in range(20)]
    conv = await conversations.create_group(pools, ids, owner, users, "t")
    make = Maker(conv.id, ids)
    target = make(owner)
    await append(pools, conv.id, [target])
    batch = [make(u, "react", "👍", target.id) for u in users]
    batch += [make(u, "unreact", "👍", target.id) for u in users[:5]]

    physical = pools.for_id(conv.id)
    async with pools.transaction(physical) as first:
        stored, _, _ = await messages.append_batch(first, batch)
        assert len(stored) == 25
        zombie = asyncio.create_task(sequence(pools, [dataclasses.replace(x) for x in batch]))
        for _ in range(200):  # until the zombie waits on a lock this transaction holds
            # pg_locks, not pg_stat_activity (a snapshot within a transaction); a row lock
            # wait is on the holder's transaction id, which names no database.
            blocked = await first.fetchval(
                """SELECT count(*) FROM pg_locks
                   WHERE NOT granted AND locktype = 'transactionid'
                     AND transactionid = txid_current()::text::xid"""
            )
            if blocked:
                break
            await asyncio.sleep(0.02)
        assert blocked, "the second transaction never waited on the first"
    result = await zombie
    assert not result.held and not result.poison and not result.errors
    assert result.stored == [] and len(result.redelivered) == 25
    assert sorted(m.seq for m in result.redelivered) == list(range(2, 27))
    assert await counts(pools, conv.id, target.id) == {"👍": 15}
    assert await messages.latest_seq(pools, conv.id) == 26
