"""The storage layer against real PostgreSQL shards: migrations, data access, a dead shard.

Uses the session engines from tests/conftest.py. Every test makes its own user names (a
random tag), so it shares the shard databases with other tests without seeing their rows.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from core.errors import ShardUnavailable
from core.settings import Settings
from devstack.services import drop_databases, ensure_databases
from storage import conversations, messages, presence
from storage.ids import EPOCH_MS, IdGenerator, compose, shard_of_id
from storage.migrate import load_migrations, migrate_all, migrate_database
from storage.models import Message, NewMessage
from storage.pools import ShardPools

pytestmark = pytest.mark.engines

DEAD_DSN = "postgresql://postgres@127.0.0.1:1/nope"


def tag() -> str:
    return secrets.token_hex(4)


def users_on(pools: ShardPools, physical: int, count: int, prefix: str) -> list[str]:
    """`count` fresh user ids whose home is physical shard `physical`."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        name = f"{prefix}user{i}"
        if pools.for_user(name) == physical:
            found.append(name)
        i += 1
    return found


def with_db_name(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- migrations ---------------------------------------------------------------------------


async def test_migrate_all_again_applies_nothing(settings: Settings) -> None:
    applied = await migrate_all(settings.shard_dsns)
    assert len(applied) == len(settings.shard_dsns)
    assert all(versions == [] for versions in applied.values()), applied


async def test_concurrent_migrations_apply_each_file_once(settings: Settings) -> None:
    base = urlsplit(settings.shard_dsns[0]).path.lstrip("/")
    dsn = with_db_name(settings.shard_dsns[0], f"{base}_mig_{tag()}")
    assert await ensure_databases((dsn,)) == [urlsplit(dsn).path.lstrip("/")]
    try:
        expected = [m.version for m in load_migrations()]
        assert expected, "no migrations found"
        results = await asyncio.gather(*(migrate_database(dsn) for _ in range(5)))
        # Exactly one run applied everything; the others waited on the lock and found it done.
        assert sorted(results, key=len) == [[]] * 4 + [expected]
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
            tables = {
                r["tablename"]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname='public'"
                )
            }
        finally:
            await conn.close()
        assert [r["version"] for r in rows] == expected
        assert [r["name"] for r in rows] == [m.name for m in load_migrations()]
        assert {"conversations", "members", "user_conversations", "messages"} <= tables
        assert await migrate_database(dsn) == []
    finally:
        await drop_databases((dsn,))


# -- conversations ------------------------------------------------------------------------


@pytest.mark.parametrize("physical", [0, 1])
async def test_group_round_trip_on_each_shard(
    pools: ShardPools, ids: IdGenerator, physical: int
) -> None:
    creator, alice, bob = users_on(pools, physical, 3, tag())
    conv = await conversations.create_group(pools, ids, creator, [alice, alice], "Team")
    assert pools.for_id(conv.id) == physical
    assert shard_of_id(conv.id) == pools.map.logical_for_user(creator)
    assert conv.kind == "group"
    assert conv.members == tuple(sorted({creator, alice}))
    assert conv.created_by == creator
    assert conv.last_seq == 0

    fetched = await conversations.get_conversation(pools, conv.id)
    assert fetched == conv
    assert await conversations.access(pools, conv.id, alice) == ("group", True)
    assert await conversations.access(pools, conv.id, bob) == ("group", False)

    assert await conversations.add_member(pools, conv.id, bob) is True
    assert await conversations.add_member(pools, conv.id, bob) is False
    assert await conversations.access(pools, conv.id, bob) == ("group", True)
    assert [c.id for c in await conversations.list_for_user(pools, bob)] == [conv.id]
    fetched = await conversations.get_conversation(pools, conv.id)
    assert fetched is not None and fetched.members == tuple(sorted({creator, alice, bob}))

    assert await conversations.remove_member(pools, conv.id, alice) is True
    assert await conversations.remove_member(pools, conv.id, alice) is False
    assert await conversations.access(pools, conv.id, alice) == ("group", False)
    assert await conversations.list_for_user(pools, alice) == []
    fetched = await conversations.get_conversation(pools, conv.id)
    assert fetched is not None and fetched.members == tuple(sorted({creator, bob}))


async def test_missing_conversation(pools: ShardPools) -> None:
    for physical in (0, 1):
        logical = next(s for s in range(4096) if pools.map.physical(s) == physical)
        ghost = compose(EPOCH_MS + 1, logical, 0)  # no conversation was made in 2024's 1st ms
        assert await conversations.get_conversation(pools, ghost) is None
        assert await conversations.access(pools, ghost, "anyone") is None
        assert await messages.latest_seq(pools, ghost) == 0


@pytest.mark.parametrize(("physical_a", "physical_b"), [(0, 0), (1, 1), (0, 1), (1, 0)])
async def test_create_direct_is_idempotent(
    pools: ShardPools, ids: IdGenerator, physical_a: int, physical_b: int
) -> None:
    prefix = tag()
    a = users_on(pools, physical_a, 1, prefix + "a")[0]
    b = users_on(pools, physical_b, 1, prefix + "b")[0]
    first, created = await conversations.create_direct(pools, ids, a, b)
    assert created is True
    assert first.kind == "direct"
    assert first.members == tuple(sorted((a, b)))
    # It lives on the smaller user's shard, whichever side asks.
    assert pools.for_id(first.id) == pools.for_user(min(a, b))
    again, created = await conversations.create_direct(pools, ids, b, a)
    assert created is False
    assert again.id == first.id
    for user in (a, b):
        assert [c.id for c in await conversations.list_for_user(pools, user)] == [first.id]
        assert await conversations.access(pools, first.id, user) == ("direct", True)


async def test_create_direct_concurrently_creates_once(pools: ShardPools, ids: IdGenerator) -> None:
    prefix = tag()
    a = users_on(pools, 0, 1, prefix + "a")[0]
    b = users_on(pools, 1, 1, prefix + "b")[0]
    # Separate generators, as separate processes would have.
    results = await asyncio.gather(
        *(
            conversations.create_direct(pools, IdGenerator(), *((a, b) if i % 2 else (b, a)))
            for i in range(8)
        )
    )
    assert sum(created for _, created in results) == 1
    assert len({conv.id for conv, _ in results}) == 1
    conv_id = results[0][0].id
    owner = pools.for_id(conv_id)
    async with pools.connection(owner) as conn:
        count = await conn.fetchval(
            "SELECT count(*) FROM conversations WHERE direct_key = $1",
            conversations.direct_key(a, b),
        )
        members = await conn.fetchval("SELECT count(*) FROM members WHERE conv_id = $1", conv_id)
    assert (count, members) == (1, 2)


async def test_list_for_user_orders_by_last_activity(pools: ShardPools, ids: IdGenerator) -> None:
    prefix = tag()
    me = users_on(pools, 0, 1, prefix + "me")[0]
    on0 = users_on(pools, 0, 1, prefix + "x")[0]
    on1 = users_on(pools, 1, 1, prefix + "y")[0]
    # Conversations on both shards (created by users on each), all including `me`.
    made = []
    for i, creator in enumerate([on0, on1, on0, on1]):
        made.append(await conversations.create_group(pools, ids, creator, [me], f"g{i}"))
        # Distinct creation ms: same-ms ties fall back to id order, which across logical
        # shards is not creation order (the shard bits sit above the sequence bits).
        await asyncio.sleep(0.003)
    assert {pools.for_id(c.id) for c in made} == {0, 1}
    listed = await conversations.list_for_user(pools, me)
    assert [c.id for c in listed] == [c.id for c in reversed(made)]

    # A message in the oldest conversation makes it the most recently active.
    oldest = made[0]
    async with pools.transaction(pools.for_id(oldest.id)) as conn:
        stored, _, _ = await messages.append_batch(
            conn, [NewMessage(oldest.id, ids.next_id(0), on0, "c1", "hi", now_ms() + 1000, "text")]
        )
    assert len(stored) == 1
    listed = await conversations.list_for_user(pools, me)
    assert [c.id for c in listed] == [oldest.id] + [c.id for c in reversed(made[1:])]
    assert listed[0].last_seq == 1
    assert listed[0].last_activity_ms >= listed[1].last_activity_ms


async def test_list_for_user_ignores_index_rows_without_membership(
    pools: ShardPools, ids: IdGenerator
) -> None:
    creator, outsider = users_on(pools, 1, 2, tag())
    conv = await conversations.create_group(pools, ids, creator, [], "private")
    async with pools.connection(pools.for_user(outsider)) as conn:
        await conn.execute(
            "INSERT INTO user_conversations (user_id, conv_id) VALUES ($1, $2)", outsider, conv.id
        )
    assert await conversations.list_for_user(pools, outsider) == []


async def test_cross_shard_membership_and_index_repair(pools: ShardPools, ids: IdGenerator) -> None:
    prefix = tag()
    creator = users_on(pools, 0, 1, prefix + "c")[0]
    member = users_on(pools, 1, 1, prefix + "m")[0]
    conv = await conversations.create_group(pools, ids, creator, [member], "across")
    assert pools.for_id(conv.id) == 0

    # From the conversation's side (shard 0).
    fetched = await conversations.get_conversation(pools, conv.id)
    assert fetched is not None and member in fetched.members
    assert await conversations.access(pools, conv.id, member) == ("group", True)
    # From the member's side (the index on shard 1).
    async with pools.connection(1) as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM user_conversations WHERE user_id = $1 AND conv_id = $2",
                member,
                conv.id,
            )
            == 1
        )
    async with pools.connection(0) as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM user_conversations WHERE user_id = $1", member
            )
            == 0
        )
    listed = await conversations.list_for_user(pools, member)
    assert [(c.id, c.members) for c in listed] == [(conv.id, tuple(sorted((creator, member))))]

    # Lose the index row (a crash between the two writes); repair re-derives it.
    async with pools.connection(1) as conn:
        status = await conn.execute(
            "DELETE FROM user_conversations WHERE user_id = $1 AND conv_id = $2", member, conv.id
        )
    assert status == "DELETE 1"
    assert await conversations.list_for_user(pools, member) == []
    await conversations.repair_user_index(pools, conv.id)
    assert [c.id for c in await conversations.list_for_user(pools, member)] == [conv.id]
    assert [c.id for c in await conversations.list_for_user(pools, creator)] == [conv.id]
    await conversations.repair_user_index(pools, conv.id)  # idempotent
    assert len(await conversations.list_for_user(pools, member)) == 1


# -- messages -----------------------------------------------------------------------------


def new_message(conv: int, ids: IdGenerator, sender: str, cid: str, body: str = "") -> NewMessage:
    return NewMessage(
        conv=conv,
        id=ids.next_id(shard_of_id(conv)),
        sender=sender,
        cid=cid,
        body=body or f"body of {cid}",
        ts=now_ms(),
        kind="text",
    )


@pytest.mark.parametrize("physical", [0, 1])
async def test_append_batch_sequences_dedups_and_reads_back(
    pools: ShardPools, ids: IdGenerator, physical: int
) -> None:
    alice, bob = users_on(pools, physical, 2, tag())
    conv = await conversations.create_group(pools, ids, alice, [bob], "chat")
    other = await conversations.create_group(pools, ids, bob, [alice], "other")
    assert pools.for_id(conv.id) == pools.for_id(other.id) == physical
    ghost = compose(EPOCH_MS + 1, shard_of_id(conv.id), 7)  # on this shard, never created

    batch = [new_message(conv.id, ids, alice if i % 2 else bob, f"c{i}") for i in range(5)]
    repeat = new_message(conv.id, ids, batch[2].sender, batch[2].cid, "a retried copy")
    orphan = new_message(ghost, ids, alice, "lost")
    side = new_message(other.id, ids, alice, "c0")  # same sender+cid, other conversation
    sent = [*batch[:3], repeat, orphan, *batch[3:], side]

    async with pools.transaction(physical) as conn:
        stored, already, orphans = await messages.append_batch(conn, sent)
    mine = [m for m in stored if m.conv == conv.id]
    assert [m.seq for m in mine] == [1, 2, 3, 4, 5]
    assert [m.id for m in mine] == [m.id for m in batch]
    assert [m.cid for m in mine] == [m.cid for m in batch]
    assert mine[2].body == batch[2].body  # the first of an in-batch repeat wins
    assert [(m.conv, m.seq, m.cid) for m in stored if m.conv == other.id] == [(other.id, 1, "c0")]
    assert len(stored) == 6
    assert already == []
    assert orphans == [orphan]

    # Redelivery of the same batch: nothing new, the earlier rows come back with their seqs.
    async with pools.transaction(physical) as conn:
        stored2, already2, orphans2 = await messages.append_batch(conn, sent)
    assert stored2 == []
    assert sorted(already2, key=lambda m: (m.conv, m.seq)) == sorted(
        stored, key=lambda m: (m.conv, m.seq)
    )
    assert orphans2 == [orphan]
    async with pools.transaction(physical) as conn:
        stored2, already2, orphans2 = await messages.append_batch(conn, batch[:2])
    assert (stored2, orphans2) == ([], [])
    assert sorted(m.seq for m in already2) == [1, 2]
    assert {m.id for m in already2} == {batch[0].id, batch[1].id}
    assert await messages.latest_seq(pools, conv.id) == 5
    assert await messages.latest_seq(pools, other.id) == 1
    assert await messages.latest_seq(pools, ghost) == 0

    # A later batch mixing a redelivered message and new ones continues the sequence.
    more = [new_message(conv.id, ids, alice, f"d{i}") for i in range(3)]
    async with pools.transaction(physical) as conn:
        stored3, already3, orphans3 = await messages.append_batch(conn, [batch[0], *more])
    assert [m.seq for m in stored3] == [6, 7, 8]
    assert [m.seq for m in already3] == [1]
    assert orphans3 == []
    everything = mine + stored3

    def seqs(ms: list[Message]) -> list[int]:
        return [m.seq for m in ms]

    assert await messages.after(pools, conv.id, 0, 100) == everything
    assert seqs(await messages.after(pools, conv.id, 2, 3)) == [3, 4, 5]
    assert seqs(await messages.after(pools, conv.id, 8, 10)) == []
    assert seqs(await messages.before(pools, conv.id, None, 3)) == [8, 7, 6]
    assert seqs(await messages.before(pools, conv.id, 4, 10)) == [3, 2, 1]
    assert seqs(await messages.before(pools, conv.id, 1, 10)) == []
    assert seqs(await messages.between(pools, conv.id, 1, 5)) == [2, 3, 4]
    assert seqs(await messages.between(pools, conv.id, 0, 100)) == list(range(1, 9))
    assert seqs(await messages.between(pools, conv.id, 3, 4)) == []
    assert await messages.after(pools, ghost, 0, 10) == []
    assert await messages.latest_seq(pools, conv.id) == 8
    fetched = await conversations.get_conversation(pools, conv.id)
    assert fetched is not None and fetched.last_seq == 8


async def test_append_batch_rolls_back_with_its_transaction(
    pools: ShardPools, ids: IdGenerator
) -> None:
    (alice,) = users_on(pools, 1, 1, tag())
    conv = await conversations.create_group(pools, ids, alice, [], "rollback")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with pools.transaction(1) as conn:
            stored, _, _ = await messages.append_batch(
                conn, [new_message(conv.id, ids, alice, "x")]
            )
            assert [m.seq for m in stored] == [1]
            raise Boom
    assert await messages.latest_seq(pools, conv.id) == 0
    assert await messages.after(pools, conv.id, 0, 10) == []
    async with pools.transaction(1) as conn:
        stored, _, _ = await messages.append_batch(conn, [new_message(conv.id, ids, alice, "x")])
    assert [m.seq for m in stored] == [1]


# -- a shard that is down -----------------------------------------------------------------


async def test_dead_shard_fails_only_what_needs_it(
    settings: Settings, pools: ShardPools, ids: IdGenerator
) -> None:
    broken = ShardPools(settings.with_overrides(shard_dsns=(settings.shard_dsns[0], DEAD_DSN)))
    try:
        prefix = tag()
        (user0,) = users_on(broken, 0, 1, prefix + "z")
        (user1,) = users_on(broken, 1, 1, prefix + "o")

        started = time.monotonic()
        with pytest.raises(ShardUnavailable) as err:
            await conversations.create_group(broken, ids, user1, [], "doomed")
        assert time.monotonic() - started < settings.pg_timeout_s + 2
        message = str(err.value)
        assert "#1" in message and "127.0.0.1:1" in message, message
        assert err.value.retriable and err.value.status == 503 and err.value.code == "unavailable"
        logical1 = pools.map.logical_for_user(user1)
        with pytest.raises(ShardUnavailable, match="#1"):
            await conversations.get_conversation(broken, compose(now_ms(), logical1, 0))
        with pytest.raises(ShardUnavailable, match=re.escape("127.0.0.1:1")):
            await conversations.list_for_user(broken, user1)

        # Shard 0 keeps working through the same pools, before and after the failures.
        conv = await conversations.create_group(broken, ids, user0, [], "fine")
        assert await conversations.access(broken, conv.id, user0) == ("group", True)
        async with broken.transaction(0) as conn:
            stored, _, _ = await messages.append_batch(
                conn, [new_message(conv.id, ids, user0, "m")]
            )
        assert [m.seq for m in stored] == [1]
        assert [c.id for c in await conversations.list_for_user(broken, user0)] == [conv.id]

        # A membership on shard 0 whose member's index is on the dead shard: the membership
        # commits, the index write fails, and repair (once the shard is back) restores it.
        with pytest.raises(ShardUnavailable):
            await conversations.create_group(broken, ids, user0, [user1], "half")
        async with pools.connection(0) as conn:
            half = await conn.fetchval(
                "SELECT id FROM conversations WHERE created_by = $1 AND title = 'half'", user0
            )
        assert half is not None
        assert await conversations.access(broken, half, user1) == ("group", True)
        assert await conversations.list_for_user(pools, user1) == []
        await conversations.repair_user_index(pools, half)
        assert [c.id for c in await conversations.list_for_user(pools, user1)] == [half]

        status = await broken.ping()
        assert list(status) == broken.names
        assert status[broken.names[0]] is None
        error = status[broken.names[1]]
        assert error is not None and "#1" in error and "127.0.0.1:1" in error
        assert await pools.ping() == dict.fromkeys(pools.names)
    finally:
        await broken.close()


@pytest.mark.parametrize("physical", [0, 1])
async def test_coalesced_stored_id_reads_answer_like_one_read_each(
    pools: ShardPools, ids: IdGenerator, physical: int
) -> None:
    """The send path's shard reads (gateway/lookups.py): reads made while one is in flight
    share one query, and each gets what `stored_id` alone answers (a stored message, a
    refused event, nothing); a lone read goes out alone."""
    from gateway.lookups import StoredLookups

    alice, bob = users_on(pools, physical, 2, tag())
    conv = await conversations.create_group(pools, ids, alice, [bob], "chat")
    batch = [new_message(conv.id, ids, alice if i % 2 else bob, f"c{i}") for i in range(6)]
    async with pools.transaction(physical) as conn:
        await messages.append_batch(conn, batch)
        await conn.execute(
            "INSERT INTO refused_events (conv_id, sender, cid, id, ts) VALUES ($1, $2, $3, $4, $5)",
            conv.id,
            alice,
            "refused",
            ids.next_id(shard_of_id(conv.id)),
            123,
        )
    asked = [(conv.id, m.sender, m.cid) for m in batch]
    asked += [(conv.id, alice, "refused"), (conv.id, alice, "never"), (conv.id, bob, "c1")]
    expected = [await messages.stored_id(pools, *k) for k in asked]
    assert expected[-3] is not None and expected[-3][1] == 123
    assert expected[-2] is None and expected[-1] is None  # c1 is alice's, not bob's

    lookups = StoredLookups(pools)
    assert await asyncio.gather(*(lookups.ask(*k) for k in asked)) == expected
    assert lookups.reads == len(asked)
    assert lookups.queries == 1  # all asked before the loop ran the first: one query

    alone = StoredLookups(pools)
    for k, want in zip(asked, expected, strict=True):
        assert await alone.ask(*k) == want
    assert alone.queries == alone.reads == len(asked)


async def test_the_rooms_of_users_coming_online_together_are_read_once_per_shard(
    pools: ShardPools, ids: IdGenerator
) -> None:
    """Presence's read of the rooms of users coming online (storage/presence.py:
    shared_many, coalesced by gateway/coalesce.py): each user gets their direct
    conversations and groups with their sizes, wherever those live, as if read alone; a
    user in none gets none; users asked together cost one read."""
    from gateway.coalesce import Coalescer

    t = tag()
    a, b, lonely = users_on(pools, 0, 3, f"on{t}")
    far = users_on(pools, 1, 1, f"far{t}")[0]
    near = await conversations.create_group(pools, ids, a, [b], "near")  # on shard 0
    away = await conversations.create_group(pools, ids, far, [a, b], "away")  # on shard 1
    dm, _ = await conversations.create_direct(pools, ids, a, far)
    assert pools.for_id(near.id) == 0 and pools.for_id(away.id) == 1
    rooms_a = sorted([(near.id, 2), (away.id, 3), (dm.id, 2)])
    rooms_b = sorted([(near.id, 2), (away.id, 3)])

    got = await presence.shared_many(pools, 0, [a, b, lonely, a])
    assert [sorted(r) for r in got] == [rooms_a, rooms_b, [], rooms_a]
    assert [len(r) for r in await presence.shared_many(pools, 0, [a, b], limit=1)] == [1, 1]
    alone = [sorted((await presence.shared_many(pools, 0, [u]))[0]) for u in (a, b, lonely)]
    assert alone == [rooms_a, rooms_b, []]

    calls: list[list[str]] = []

    async def fetch(physical: int, users: list[str]) -> list[list[tuple[int, int]]]:
        calls.append(users)
        return await presence.shared_many(pools, physical, users)

    rooms: Coalescer[str, list[tuple[int, int]]] = Coalescer(fetch)
    together = await asyncio.gather(*(rooms.read(0, u) for u in (a, b, lonely)))
    assert [sorted(r) for r in together] == [rooms_a, rooms_b, []]
    assert calls == [[a, b, lonely]] and rooms.queries == 1 and rooms.reads == 3
