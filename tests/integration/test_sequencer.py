"""fanout.sequencer's failure paths on the real shards: the faults are forced by the
database itself (a counter at its limit, a trigger that raises a chosen SQLSTATE for one
conversation's rows, a row lock, a terminated backend), and each test checks what comes
back: stored, redelivered, held (with why) or poison, never a message lost or stored twice.

The triggers match only conversations a test made, and are dropped when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from core.settings import Settings
from fanout.holding import fenced_key
from fanout.sequencer import Sequenced, sequence
from storage import conversations, messages
from storage.fence import fence, unfence
from storage.ids import IdGenerator, compose, now_ms, shard_of_id
from storage.models import NewMessage
from storage.pgerrors import IDEMPOTENCY_KEY
from storage.pools import HELD_APPLICATION_NAME, ShardPools
from tests.integration.test_storage import new_message, users_on

pytestmark = pytest.mark.engines

MAX_BIGINT = 9223372036854775807


async def _group(pools: ShardPools, ids: IdGenerator, physical: int) -> tuple[int, str]:
    a, b = users_on(pools, physical, 2, secrets.token_hex(4))
    conv = await conversations.create_group(pools, ids, a, [b], "c")
    assert pools.for_id(conv.id) == physical
    return conv.id, a


@asynccontextmanager
async def raising_on_insert(
    pools: ShardPools, physical: int, conv: int, errcode: str, *, constraint: str = "", once: bool
) -> AsyncIterator[None]:
    """While open, storing a message of `conv` on its shard fails with `errcode` (every
    time, or only the first time when `once`)."""
    name = f"t_fault_{secrets.token_hex(4)}"
    using = f"ERRCODE = '{errcode}'" + (f", CONSTRAINT = '{constraint}'" if constraint else "")
    first = f"nextval('{name}_n') = 1" if once else "true"
    async with pools.connection(physical) as conn:
        await conn.execute(f"CREATE SEQUENCE {name}_n")
        await conn.execute(
            f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF {first} THEN RAISE EXCEPTION 'forced by the test' USING {using}; END IF;
                  RETURN NEW;
                END $$"""
        )
        await conn.execute(
            f"""CREATE TRIGGER {name} BEFORE INSERT ON messages FOR EACH ROW
                WHEN (NEW.conv_id = {conv}) EXECUTE FUNCTION {name}()"""
        )
    try:
        yield
    finally:
        async with pools.connection(physical) as conn:
            await conn.execute(f"DROP TRIGGER {name} ON messages")
            await conn.execute(f"DROP FUNCTION {name}()")
            await conn.execute(f"DROP SEQUENCE {name}_n")


async def _at_limit(pools: ShardPools, conv: int) -> None:
    # The conversation's seq counter cannot move: its UPDATE overflows bigint (22003).
    async with pools.connection(pools.for_id(conv)) as conn:
        await conn.execute("UPDATE conversations SET last_seq = $2 WHERE id = $1", conv, MAX_BIGINT)


async def test_poison_in_a_batch_is_told_apart_and_the_rest_is_stored(
    pools: ShardPools, ids: IdGenerator
) -> None:
    bad, a = await _group(pools, ids, 0)
    good, b = await _group(pools, ids, 0)
    await _at_limit(pools, bad)
    batch = [new_message(good, ids, b, "g1"), new_message(bad, ids, a, "b1")]
    batch.append(new_message(good, ids, b, "g2"))
    out = await sequence(pools, batch)
    # The shard's transaction failed for one message: one transaction per message finds it.
    assert [(m.cid, m.seq) for m in out.stored] == [("g1", 1), ("g2", 2)]
    assert [(m.cid, why[:5]) for m, why in out.poison] == [("b1", "22003")]
    assert out.held == [] and out.errors == {}
    # Alone in its batch, the poison is told at once.
    alone = await sequence(pools, [new_message(bad, ids, a, "b2")])
    assert [m.cid for m, _ in alone.poison] == ["b2"] and alone.stored == []


async def test_a_transient_failure_while_isolating_poison_holds_the_rest_in_order(
    pools: ShardPools, ids: IdGenerator
) -> None:
    bad, a = await _group(pools, ids, 1)
    good, b = await _group(pools, ids, 1)
    await _at_limit(pools, bad)
    batch = [
        new_message(bad, ids, a, "b1"),
        new_message(good, ids, b, "g1"),
        new_message(good, ids, b, "g2"),
    ]
    # The batch fails on the poison; storing the good conversation's first message alone
    # then meets a serialization failure: it and every later message of the shard wait.
    async with raising_on_insert(pools, 1, good, "40001", once=False):
        out = await sequence(pools, batch)
    assert [m.cid for m, _ in out.poison] == ["b1"]
    assert out.held == batch[1:] and out.stored == []
    assert out.errors[pools.names[1]].startswith("40001 ")
    # Retried once the shard works: stored in order.
    again = await sequence(pools, out.held)
    assert [(m.cid, m.seq) for m in again.stored] == [("g1", 1), ("g2", 2)]


async def test_a_sequencing_race_is_retried_and_one_that_persists_is_held(
    pools: ShardPools, ids: IdGenerator, caplog: pytest.LogCaptureFixture
) -> None:
    conv, a = await _group(pools, ids, 0)
    m = new_message(conv, ids, a, "r1")
    # The idempotency key's violation (another worker stored it between the check and the
    # insert), once: retried at once, stored.
    caplog.set_level(logging.INFO, "fanout.sequencer")
    async with raising_on_insert(pools, 0, conv, "23505", constraint=IDEMPOTENCY_KEY, once=True):
        out = await sequence(pools, [m])
    assert [(x.cid, x.seq) for x in out.stored] == [("r1", 1)] and out.held == []
    assert "sequencing race on shard" in caplog.text
    # A race on every attempt: given up for the round, held like a shard that is down.
    m2 = new_message(conv, ids, a, "r2")
    async with raising_on_insert(pools, 0, conv, "23505", constraint=IDEMPOTENCY_KEY, once=False):
        out = await sequence(pools, [m2])
    assert out.held == [m2] and out.stored == [] and out.poison == []
    assert "sequencing race persisted" in out.errors[pools.names[0]]
    assert [x.cid for x in await messages.after(pools, conv, 0, 10)] == ["r1"]


async def test_an_id_that_names_no_shard_is_poison_and_the_rest_is_stored(
    pools: ShardPools, ids: IdGenerator
) -> None:
    conv, a = await _group(pools, ids, 1)
    nowhere = compose(now_ms(), 5000, 1)  # a logical shard this deployment does not have
    lost = NewMessage(nowhere, compose(now_ms(), 5000, 2), a, "x1", "b", now_ms(), "text")
    out = await sequence(pools, [lost, new_message(conv, ids, a, "ok")])
    assert out.poison == [(lost, f"conversation id {nowhere} names no shard")]
    assert [m.cid for m in out.stored] == ["ok"]
    # Nothing left for any shard: nothing is tried.
    only = await sequence(pools, [lost], budget_s=1)
    assert [m for m, _ in only.poison] == [lost] and only.stored == only.held == []


@asynccontextmanager
async def row_locked(settings: Settings, physical: int, conv: int) -> AsyncIterator[None]:
    """The conversation's row locked by another transaction: its shard's attempt hangs."""
    locker = await asyncpg.connect(settings.shard_dsns[physical])
    tx = locker.transaction()
    await tx.start()
    await locker.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conv)
    try:
        yield
    finally:
        await tx.rollback()
        await locker.close()


async def _slow(
    pools: ShardPools, m: NewMessage, physical: int
) -> tuple[Sequenced, asyncio.Future[Sequenced]]:
    slow: dict[int, asyncio.Future[Sequenced]] = {}
    out = await asyncio.wait_for(sequence(pools, [m], budget_s=0.3, slow=slow), 5)
    assert out.held == [m] and list(slow) == [physical]
    return out, slow[physical]


async def test_a_slow_attempt_that_then_fails_says_why_and_the_retry_stores_once(
    pools: ShardPools, ids: IdGenerator, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    conv, a = await _group(pools, ids, 0)
    m = new_message(conv, ids, a, "s1")
    caplog.set_level(logging.INFO, "fanout.sequencer")
    admin = await asyncpg.connect(settings.shard_dsns[0])
    try:
        async with row_locked(settings, 0, conv):
            _, attempt = await _slow(pools, m, 0)
            # The hung attempt's backend is terminated (a shard host restarted).
            db = settings.shard_dsns[0].rsplit("/", 1)[1]
            deadline = asyncio.get_running_loop().time() + 5
            while not await admin.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = $1 AND wait_event_type = 'Lock'""",
                db,
            ):
                assert asyncio.get_running_loop().time() < deadline, "no backend waits"
                await asyncio.sleep(0.05)
            late = await asyncio.wait_for(attempt, 5)
    finally:
        await admin.close()
    assert late.held == [m] and late.stored == []
    assert "slow shard attempt ended with 1 messages held" in caplog.text
    again = await sequence(pools, [m], budget_s=5)
    assert [(x.cid, x.seq) for x in again.stored] == [("s1", 1)]


async def test_a_slow_attempt_cancelled_at_shutdown_stores_nothing_and_logs_nothing(
    pools: ShardPools, ids: IdGenerator, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    conv, a = await _group(pools, ids, 1)
    m = new_message(conv, ids, a, "c1")
    caplog.set_level(logging.INFO, "fanout.sequencer")
    async with row_locked(settings, 1, conv):
        _, attempt = await _slow(pools, m, 1)
        attempt.cancel()  # what the event loop does to it when the worker exits
        with pytest.raises(asyncio.CancelledError):
            await attempt
    assert "slow shard attempt" not in caplog.text
    assert await messages.after(pools, conv, 0, 10) == []
    # A caller that keeps no slow attempts (slow=None) still gets the shard's messages
    # back held, its attempt left to end on its own.
    async with row_locked(settings, 1, conv):
        out = await asyncio.wait_for(sequence(pools, [m], budget_s=0.3), 5)
        assert out.held == [m] and "did not answer" in out.errors[pools.names[1]]
    # The attempt left running stored it once the lock went; the retry finds it there.
    again = await sequence(pools, [m], budget_s=5)
    assert [(x.cid, x.seq) for x in again.in_order()] == [("c1", 1)]
    assert [x.cid for x in await messages.after(pools, conv, 0, 10)] == ["c1"]


async def test_a_fence_refuses_only_its_logical_shards_messages_and_the_rest_is_stored(
    pools: ShardPools, ids: IdGenerator
) -> None:
    """A shard move's fence refuses the transaction of a batch that has one message of a
    fenced logical shard: the batch is split, the fenced shard's messages come back in
    `fenced` (held per logical shard), the rest of the database's are stored now, with
    their mentions' inbox entries (on the conversation's shard: fenced with it, not with
    the users)."""
    moving, a = await _group(pools, ids, 0)
    while True:
        b, named = users_on(pools, 0, 2, secrets.token_hex(4))
        if pools.map.logical_for_user(b) != shard_of_id(moving):
            break
    staying = (await conversations.create_group(pools, ids, b, [named], "c")).id
    assert pools.for_id(staying) == 0
    batch = [
        new_message(moving, ids, a, "f1"),
        new_message(staying, ids, b, "s1", f"hello @{named}"),
        new_message(moving, ids, a, "f2"),
        new_message(staying, ids, b, "s2"),
    ]
    await fence(pools, 0, [shard_of_id(moving)])
    try:
        out = await sequence(pools, batch)
        assert [(m.cid, m.seq) for m in out.stored] == [("s1", 1), ("s2", 2)]
        assert out.stored[0].notify == ((named, "mention"),)
        assert out.fenced == [batch[0], batch[2]] and out.held == [] and out.poison == []
        assert list(out.errors) == [fenced_key(shard_of_id(moving))]
        assert "being moved" in out.errors[fenced_key(shard_of_id(moving))]
        # Still fenced on the retry; nothing of it stored.
        again = await sequence(pools, out.fenced)
        assert again.fenced == out.fenced and again.stored == []
    finally:
        await unfence(pools, 0)
    done = await sequence(pools, out.fenced)
    assert [(m.cid, m.seq) for m in done.stored] == [("f1", 1), ("f2", 2)]
    assert done.fenced == [] and done.errors == {}


async def test_an_attempt_that_timed_out_is_stopped_on_the_server_not_left_to_commit(
    pools: ShardPools, ids: IdGenerator, settings: Settings
) -> None:
    """A batch whose statement hangs (a row lock) until the command timeout is held by the
    worker and retried; the statement must be stopped on the server, as a pooled
    connection's release makes sure of. A held connection terminated at once drops the
    cancel request asyncpg just asked for: the backend goes on waiting and, once the
    lock goes, commits a batch the worker was told had failed (one more backend per retry
    meanwhile, each holding a connection slot)."""
    conv, a = await _group(pools, ids, 0)
    m = new_message(conv, ids, a, "t1")
    admin = await asyncpg.connect(settings.shard_dsns[0])
    db = settings.shard_dsns[0].rsplit("/", 1)[1]
    waiting = """SELECT count(*) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = $2 AND state = 'active'"""
    try:
        async with row_locked(settings, 0, conv):
            _, attempt = await _slow(pools, m, 0)
            # The command timeout (at least 10 s) ends it: held, nothing stored.
            late = await asyncio.wait_for(attempt, pools._command_timeout + 10)
            assert late.held == [m] and late.stored == []
            # Still under the lock: the statement must be gone from the server by now.
            running = await admin.fetchval(waiting, db, HELD_APPLICATION_NAME)
        # Bounded: a statement left running gets the lock now and commits at once.
        deadline = asyncio.get_running_loop().time() + 5
        while await admin.fetchval(waiting, db, HELD_APPLICATION_NAME):
            assert asyncio.get_running_loop().time() < deadline, "a held backend still runs"
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    assert await messages.after(pools, conv, 0, 10) == [], "committed after it failed"
    assert running == 0, "the timed-out statement still runs on the server"
    again = await sequence(pools, [m], budget_s=5)
    assert [(x.cid, x.seq) for x in again.stored] == [("t1", 1)]
