"""The one-statement path (storage/onetrip.py) against the transactional one
(storage/messages.py: append_batch) on the real shards: the same inputs give the same
(stored, already, orphans) and leave the same rows; the sequencer really takes it (one
statement, no BEGIN/COMMIT); a concurrent store of the same message is the race it was; its
row locks are taken in conversation id order; a poison message is still found one by one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from core.settings import Settings
from fanout.sequencer import sequence
from storage import conversations, messages, onetrip
from storage.ids import IdGenerator, compose, now_ms, shard_of_id
from storage.models import Message, NewMessage
from storage.pools import ShardPools
from tests.integration.test_storage import new_message, users_on

pytestmark = pytest.mark.engines

MAX_BIGINT = 9223372036854775807


def tag() -> str:
    return secrets.token_hex(4)


async def _group(pools: ShardPools, ids: IdGenerator, physical: int) -> tuple[int, str, str]:
    a, b = users_on(pools, physical, 2, tag())
    conv = await conversations.create_group(pools, ids, a, [b], "g")
    assert pools.for_id(conv.id) == physical
    return conv.id, a, b


async def _direct(pools: ShardPools, ids: IdGenerator, physical: int) -> tuple[int, str, str]:
    a, b = users_on(pools, physical, 2, tag())
    conv, _ = await conversations.create_direct(pools, ids, a, b)
    assert pools.for_id(conv.id) == physical
    return conv.id, a, b


def _shown(ms: list[Message]) -> list[tuple[Any, ...]]:
    # Every field, dm_to too (it takes no part in Message's equality).
    return [(*dataclasses.astuple(m), m.dm_to) for m in ms]


async def _state(conn: Any, convs: list[int]) -> tuple[list[Any], list[Any]]:
    rows = await conn.fetch(
        "SELECT * FROM messages WHERE conv_id = ANY($1::bigint[]) ORDER BY conv_id, seq", convs
    )
    heads = await conn.fetch(
        "SELECT id, last_seq, last_message_at FROM conversations"
        " WHERE id = ANY($1::bigint[]) ORDER BY id",
        convs,
    )
    return [tuple(r) for r in rows], [tuple(r) for r in heads]


async def _both_ways(pools: ShardPools, physical: int, batch: list[NewMessage]) -> Any:
    """The transactional path's result and rows (rolled back), then the one-statement
    path's on the same state (committed); asserts they are the same, returns the latter."""
    assert onetrip.fits(batch)
    convs = sorted({m.conv for m in batch})
    async with pools.connection(physical) as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            full = await messages.append_batch(conn, batch)
            full_state = await _state(conn, convs)
        finally:
            await tx.rollback()
        fast = await onetrip.append(conn, batch)
        assert not conn.is_in_transaction()
        fast_state = await _state(conn, convs)
    f_stored, f_already, f_orphans = full
    stored, already, orphans = fast
    assert _shown(stored) == _shown(f_stored)
    # The dedup SELECT returns redeliveries in no set order; the statement in batch order.
    assert sorted(_shown(already)) == sorted(_shown(f_already))
    assert orphans == f_orphans
    assert fast_state == full_state
    return fast


async def test_the_same_result_as_the_transactional_path(
    pools: ShardPools, ids: IdGenerator
) -> None:
    physical = 1
    g1, a, b = await _group(pools, ids, physical)
    g2, c, d = await _group(pools, ids, physical)
    dm, x, y = await _direct(pools, ids, physical)
    ghost = compose(now_ms(), shard_of_id(g1), 7)  # on this shard, never created

    # Fresh messages of one conversation.
    first = [new_message(g1, ids, a if i % 2 else b, f"f{i}") for i in range(3)]
    stored, already, orphans = await _both_ways(pools, physical, first)
    assert [m.seq for m in stored] == [1, 2, 3] and already == orphans == []

    # A redelivery mixed with fresh ones, an in-batch repeat (the first wins), an orphan,
    # and several conversations given out of id order.
    repeat = new_message(g2, ids, c, "r", "the first copy")
    again = dataclasses.replace(repeat, id=ids.next_id(shard_of_id(g2)), body="a retry")
    mixed = [
        new_message(g2, ids, c, "m0"),
        first[1],
        repeat,
        new_message(g1, ids, a, "m1"),
        new_message(ghost, ids, a, "lost"),
        again,
        first[0],
        new_message(g2, ids, d, "m2"),
        new_message(g1, ids, b, "m3"),
    ]
    stored, already, orphans = await _both_ways(pools, physical, mixed)
    assert [(m.conv, m.seq, m.cid) for m in stored] == sorted(
        [(g1, 4, "m1"), (g1, 5, "m3"), (g2, 1, "m0"), (g2, 2, "r"), (g2, 3, "m2")]
    )
    assert next(m.body for m in stored if m.cid == "r") == "the first copy"
    assert [(m.cid, m.seq) for m in already] == [("f1", 2), ("f0", 1)]
    assert [m.cid for m in orphans] == ["lost"]

    # Only redeliveries: nothing new, nothing bumped.
    stored, already, orphans = await _both_ways(pools, physical, [first[2], mixed[0]])
    assert stored == [] and len(already) == 2 and orphans == []

    # A direct conversation: fresh ones and a redelivery get their recipient.
    hello = new_message(dm, ids, x, "h0")
    stored, _, _ = await _both_ways(pools, physical, [hello])
    assert [(m.seq, m.dm_to) for m in stored] == [(1, y)]
    reply = new_message(dm, ids, y, "h1")
    stored, already, _ = await _both_ways(pools, physical, [reply, hello])
    assert [(m.seq, m.dm_to) for m in stored] == [(2, x)]
    assert [(m.seq, m.dm_to) for m in already] == [(1, y)]

    # A deleted direct message redelivered: no recipient (nothing left to show them).
    gone = NewMessage(dm, ids.next_id(shard_of_id(dm)), x, "del", "", now_ms(), "delete", hello.id)
    out = await sequence(pools, [gone])
    assert [m.kind for m in out.stored] == ["delete"]
    _, already, _ = await _both_ways(pools, physical, [hello])
    assert [(m.deleted, m.dm_to) for m in already] == [(True, None)]


def test_what_fits_the_one_statement_path() -> None:
    def m(**kw: Any) -> NewMessage:
        base = NewMessage(1, 2, "a", "c", "hello", 1, "text")
        return dataclasses.replace(base, **kw)

    assert onetrip.fits([m(), m(kind="comment")])
    assert onetrip.fits([])
    for other in (m(kind="edit", ref=5), m(kind="react", ref=5), m(body="hi @b"), m(reply_to=9)):
        assert not onetrip.fits([m(), other]), other


@pytest.fixture
async def one_conn_pools(settings: Settings) -> AsyncIterator[ShardPools]:
    """Pools of one connection per shard: every statement of a test goes through it."""
    p = ShardPools(dataclasses.replace(settings, pg_pool_max=1))
    yield p
    await p.close()


async def _statements(pools: ShardPools, physical: int, sent: list[str]) -> None:
    """Record each statement the client sends on `physical`'s only pooled connection and
    on its held one (`ShardPools.on_held`: the one-statement batches go there)."""

    def log(q: Any) -> None:
        if "typeinfo_tree" not in q.query:  # asyncpg's introspection: once per connection
            sent.append(q.query.split()[0].upper().rstrip(";"))

    async with pools.connection(physical) as conn:
        conn.add_query_logger(log)

    async def on(conn: Any) -> None:
        conn.add_query_logger(log)

    await pools.on_held(physical, on)


async def test_the_sequencer_takes_it_one_statement_per_shard_batch(
    one_conn_pools: ShardPools, ids: IdGenerator
) -> None:
    pools = one_conn_pools
    conv, a, b = await _group(pools, ids, 0)
    sent: list[str] = []
    await _statements(pools, 0, sent)
    # A connection's first use of the statement also asks for its types (asyncpg's
    # introspection, once per connection): counted from the second batch on.
    await sequence(pools, [new_message(conv, ids, a, "p0")])
    await asyncio.sleep(0)  # the logger is called soon after each statement
    sent.clear()

    held = pools.held_reads
    out = await sequence(pools, [new_message(conv, ids, a, "p1"), new_message(conv, ids, b, "p2")])
    await asyncio.sleep(0)
    assert [m.seq for m in out.stored] == [2, 3]
    assert sent == ["WITH"]  # one statement: no BEGIN, no COMMIT
    assert pools.held_reads == held + 1  # on the held connection: no acquire, no release

    # A batch that needs the transaction (an @mention is written to the inbox in it).
    sent.clear()
    out = await sequence(pools, [new_message(conv, ids, a, "p3", f"hi @{b}")])
    await asyncio.sleep(0)
    assert [(m.seq, m.notify) for m in out.stored] == [(4, ((b, "mention"),))]
    assert sent[0] == "BEGIN" and sent[-1] == "COMMIT" and "WITH" not in sent


async def test_a_concurrent_store_of_the_same_message_is_a_race_retried(
    pools: ShardPools, ids: IdGenerator, caplog: pytest.LogCaptureFixture
) -> None:
    physical = 0
    conv, a, _ = await _group(pools, ids, physical)
    m = new_message(conv, ids, a, "twice")
    caplog.set_level(logging.INFO, "fanout.sequencer")
    async with pools.connection(physical) as other:
        tx = other.transaction()
        await tx.start()
        # Another worker stores it and holds the conversation row until it commits.
        stored, _, _ = await messages.append_batch(other, [m])
        attempt = asyncio.ensure_future(sequence(pools, [m]))
        # The statement started (its snapshot does not see the other's row), then waits for
        # the conversation's row lock.
        await _waiting_for_a_lock(pools, physical)
        await tx.commit()
    out = await attempt
    # Its insert met the idempotency key: the whole statement failed (the bump of last_seq
    # with it), and the retry found the message stored.
    assert "sequencing race on shard" in caplog.text
    assert out.stored == [] and [(x.id, x.seq) for x in out.redelivered] == [(m.id, 1)]
    assert stored[0].seq == 1 and await messages.latest_seq(pools, conv) == 1


async def test_a_batch_that_waited_for_a_conversation_continues_after_the_other_batch(
    pools: ShardPools, ids: IdGenerator
) -> None:
    physical = 1
    conv, a, b = await _group(pools, ids, physical)
    async with pools.connection(physical) as other:
        tx = other.transaction()
        await tx.start()
        # Another worker sequences two messages and holds the conversation row.
        first, _, _ = await messages.append_batch(
            other, [new_message(conv, ids, a, "o1"), new_message(conv, ids, b, "o2")]
        )
        # Ours started before that commit (its snapshot shows last_seq 0), then waits.
        attempt = asyncio.ensure_future(sequence(pools, [new_message(conv, ids, b, "w1")]))
        await _waiting_for_a_lock(pools, physical)
        await tx.commit()
    out = await attempt
    # The UPDATE bumped the row as committed meanwhile (READ COMMITTED re-reads it): seq 3,
    # never a second 1.
    assert [m.seq for m in first] == [1, 2]
    assert [(m.cid, m.seq) for m in out.stored] == [("w1", 3)]
    assert [m.seq for m in await messages.after(pools, conv, 0, 10)] == [1, 2, 3]
    assert await messages.latest_seq(pools, conv) == 3


async def _waiting_for_a_lock(pools: ShardPools, physical: int) -> None:
    """Until a one-statement batch on `physical` waits for a row lock (pg_stat_activity,
    read on a connection of its own: a transaction would keep showing its first read)."""
    for _ in range(1000):
        async with pools.connection(physical) as conn:
            waiting = await conn.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE '%WITH k AS%'
                     AND datname = current_database()"""
            )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no one-statement batch waited for a lock")


async def test_conversation_rows_are_locked_in_id_order(
    pools: ShardPools, ids: IdGenerator
) -> None:
    physical = 1
    (low, a), (high, c) = sorted([(await _group(pools, ids, physical))[:2] for _ in range(2)])
    async with pools.connection(physical) as other:
        # The lower id's row version now comes after the higher's in the heap: scan order
        # is not id order.
        await other.execute("UPDATE conversations SET title = 'moved' WHERE id = $1", low)
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", high)
        # The batch names the higher id first: it must still lock the lower one first, and
        # so hold it while it waits for the higher one.
        batch = [new_message(high, ids, c, "h"), new_message(low, ids, a, "l")]
        attempt = asyncio.ensure_future(sequence(pools, batch))
        await _waiting_for_a_lock(pools, physical)
        with pytest.raises(asyncpg.LockNotAvailableError):
            await other.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE NOWAIT", low)
        await tx.rollback()
    out = await attempt
    assert sorted((m.conv, m.seq) for m in out.stored) == [(low, 1), (high, 1)]


async def test_poison_in_a_one_statement_batch_is_found_one_by_one(
    one_conn_pools: ShardPools, ids: IdGenerator
) -> None:
    pools = one_conn_pools
    bad, a, _ = await _group(pools, ids, 0)
    good, b, _ = await _group(pools, ids, 0)
    async with pools.connection(0) as conn:
        # The counter cannot move: the conversation's UPDATE overflows bigint (22003).
        await conn.execute("UPDATE conversations SET last_seq = $2 WHERE id = $1", bad, MAX_BIGINT)
    sent: list[str] = []
    await _statements(pools, 0, sent)
    await sequence(pools, [new_message(good, ids, b, "g0")])  # asyncpg's introspection
    await asyncio.sleep(0)
    sent.clear()
    batch = [new_message(good, ids, b, "g1"), new_message(bad, ids, a, "b1")]
    batch.append(new_message(good, ids, b, "g2"))
    out = await sequence(pools, batch)
    await asyncio.sleep(0)
    assert [(m.cid, m.seq) for m in out.stored] == [("g1", 2), ("g2", 3)]
    assert [(m.cid, why[:5]) for m, why in out.poison] == [("b1", "22003")]
    assert out.held == [] and out.errors == {}
    # The batch, then each message alone: every attempt one statement.
    assert sent == ["WITH"] * 4


async def test_the_statements_keep_an_index_probe_on_a_plan_made_while_messages_was_small(
    settings: Settings,
) -> None:
    """asyncpg prepares the statement; after five runs PostgreSQL keeps a generic plan for
    the connection's life, made with the statistics of that moment. Made while `messages`
    was small (a new shard), a join against it became a seq scan per batch that grew with
    the table (bench/RESULTS.md, "PostgreSQL's share"). The statement must get its generic
    plan (no planning per batch: ~0.4 ms each) and its dedup must probe the unique index
    whatever the statistics said."""
    from devstack.services import drop_databases, ensure_databases
    from storage.migrate import migrate_all

    base = settings.shard_dsns[0].rsplit("/", 1)[0]
    dsn = f"{base}/agora_plan_{tag()}"
    await ensure_databases((dsn,))
    try:
        await migrate_all((dsn,))
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "INSERT INTO conversations (id, kind, created_by)"
                " SELECT g, 'group', 'u' FROM generate_series(1, 30) g"
            )
            # Through asyncpg on a fresh, never analyzed shard, as a worker starts: planned
            # for the first five batches, then the generic plan every time.
            for i in range(8):
                batch = [
                    NewMessage(
                        conv=1 + i,
                        id=10_000 + i,
                        sender="t",
                        cid=f"n{i}",
                        body="hi",
                        ts=now_ms(),
                        kind="text",
                    )
                ]
                stored, _, _ = await onetrip.append(conn, batch)
                assert [m.seq for m in stored] == [1]
            counts = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement = $1",
                onetrip._APPEND,
            )
            assert counts is not None
            assert (counts["custom_plans"], counts["generic_plans"]) == (5, 3), dict(counts)

            # ~1,200 messages, analyzed: where the old join's generic plan was a seq scan.
            await conn.execute(
                "INSERT INTO messages (conv_id, seq, id, sender, cid, body, ts)"
                " SELECT 1 + g % 30, 100 + g, g, 's', 'c' || g, 'x', 1"
                " FROM generate_series(1, 1200) g"
            )
            await conn.execute("ANALYZE")
            types = "bigint[], bigint[], text[], text[], text[], bigint[], text[], bigint[]"
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE p({types}) AS {onetrip._APPEND}")
            rows = await conn.fetch(
                "EXPLAIN EXECUTE p('{1}', '{1}', '{a}', '{b}', '{c}', '{1}', '{text}', '{NULL}')"
            )
            plan = "\n".join(r[0] for r in rows)
            old = plan[plan.index("CTE old") : plan.index("CTE fresh")]
            assert "Index Scan using messages_conv_id_sender_cid_key" in old, plan
            assert "Seq Scan on messages" not in old, plan
            # The transactional path's read of earlier copies (storage/messages.py): the
            # same, on the same generic-plan terms.
            await conn.execute(f"PREPARE s(bigint[], text[], text[]) AS {messages._STORED_ROWS}")
            rows = await conn.fetch("EXPLAIN EXECUTE s('{1}', '{s}', '{c1}')")
            plan = "\n".join(r[0] for r in rows)
            assert "Index Scan using messages_conv_id_sender_cid_key" in plan, plan
            assert "Seq Scan on messages" not in plan, plan
            found = await conn.fetch(
                messages._STORED_ROWS, [1 + 7 % 30, 1], ["s", "s"], ["c7", "x"]
            )
            assert [(r["id"], r["cid"]) for r in found] == [(7, "c7")]
        finally:
            await conn.close()
    finally:
        await drop_databases((dsn,))


async def test_the_send_paths_coalesced_read_keeps_its_generic_plan(
    one_conn_pools: ShardPools, ids: IdGenerator
) -> None:
    """`messages.stored_ids` (the send path's reads asked while one was in flight) was
    planned anew on every call: a custom plan for 2 keys always looked cheaper than the
    generic one. Planned for the first five calls only, and it still finds what it should."""
    pools = one_conn_pools
    conv, a, _ = await _group(pools, ids, 0)
    out = await sequence(pools, [new_message(conv, ids, a, "s0")])
    stored = out.stored[0]
    for i in range(8):
        found = await messages.stored_ids(pools, 0, [(conv, a, "s0"), (conv, a, f"none{i}")])
        assert found == [(stored.id, stored.ts), None]
    async with pools.connection(0) as conn:
        counts = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
            messages._STORED_IDS,
        )
    assert counts is not None
    assert (counts["custom_plans"], counts["generic_plans"]) == (5, 3), dict(counts)
