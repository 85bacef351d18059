"""Moving logical shards to another physical database: during the switch the fence keeps
the old database from taking the moving range's writes (what users see meanwhile: retry,
or an acked message that waits); after the copy and the map switch, `agora shards prune`
removes exactly the rows each database no longer owns."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from agora_client import AgoraClient
from core.errors import ShardUnavailable
from core.settings import Settings
from devstack import services
from storage import fence as fence_module
from storage.fence import FenceBusy, fence, fenced, unfence
from storage.ids import EPOCH_MS, compose, shard_of_id
from storage.migrate import migrate_all
from storage.pgerrors import Fault, classify
from storage.pools import ShardPools
from storage.reshard import MOVED_TABLES, prune
from storage.shards import ShardMap, map_version, shard_for_user
from tests.engines import PG
from tests.integration.helpers import agora, auth, collect, collect_each, create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

BEFORE = "0-2047=0,2048-4095=1"
AFTER = "0-1023=1,1024-2047=0,2048-4095=1"  # logical 0-1023 moved from physical 0 to 1


@pytest.fixture
async def dsns(settings: Settings) -> AsyncIterator[tuple[str, str]]:
    tag = secrets.token_hex(3)
    pair = (f"{PG}/agora_move_{tag}_0", f"{PG}/agora_move_{tag}_1")
    await services.ensure_databases(pair)
    await migrate_all(pair)
    try:
        yield pair
    finally:
        await services.drop_databases(pair)


def _pools(dsns: tuple[str, str], shard_map: str) -> ShardPools:
    return ShardPools(
        Settings.from_env({"AGORA_SHARD_DSNS": ",".join(dsns), "AGORA_SHARD_MAP": shard_map})
    )


def _user_on(logical_range: range) -> str:
    while True:
        user = f"u-{secrets.token_hex(4)}"
        if shard_for_user(user, 4096) in logical_range:
            return user


async def _insert(pools: ShardPools, physical: int, post: int, user: str) -> None:
    async with pools.connection(physical) as conn:
        await conn.execute(
            "INSERT INTO posts (id, author, community, title, thread_id)"
            " VALUES ($1, $2, 'c', 't', $3)",
            post,
            user,
            post + 1,
        )
        await conn.execute(
            "INSERT INTO votes (post_id, user_id, value) VALUES ($1, $2, 1)", post, user
        )
        await conn.execute("INSERT INTO users (id) VALUES ($1)", user)


async def test_prune_after_a_move_deletes_only_rows_mapped_elsewhere(
    dsns: tuple[str, str],
) -> None:
    moved_post = compose(EPOCH_MS + 1000, 5, 1)  # logical 5: physical 0, then 1
    kept_post = compose(EPOCH_MS + 1000, 1500, 1)  # logical 1500: physical 0 throughout
    moved_user = _user_on(range(0, 1024))
    kept_user = _user_on(range(1024, 2048))
    before = _pools(dsns, BEFORE)
    try:
        # Physical 0 as it was; physical 1 after copying the moving range (and, as a whole
        # table copy does, everything else of physical 0 too).
        for physical in (0, 1):
            await _insert(before, physical, moved_post, moved_user)
            await _insert(before, physical, kept_post, kept_user)
            # Inbox entries live on their conversation's shard, whoever they are for: each
            # of these is for a user whose own rows go the other way.
            await _write(before, physical, NOTIFY, kept_user, moved_post, moved_post)
            await _write(before, physical, NOTIFY, moved_user, kept_post, kept_post)
    finally:
        await before.close()

    after = _pools(dsns, AFTER)
    try:
        dry0 = await prune(after, 0)
        dry1 = await prune(after, 1)
        print(f"dry run: physical 0 {dry0.rows}, physical 1 {dry1.rows}")
        assert dry0.rows == {
            "reactions": 0, "refused_events": 0, "messages": 0, "members": 0,
            "conversations": 0, "votes": 1, "posts": 1, "user_conversations": 0,
            "notifications": 1, "users": 1,
        }  # fmt: skip
        assert dry1.rows["posts"] == 1 and dry1.rows["votes"] == 1 and dry1.rows["users"] == 1
        async with after.connection(0) as conn:
            assert await conn.fetchval("SELECT count(*) FROM posts") == 2  # a dry run
        await prune(after, 0, dry_run=False)
        await prune(after, 1, dry_run=False)
        for physical, post, user in ((0, kept_post, kept_user), (1, moved_post, moved_user)):
            async with after.connection(physical) as conn:
                assert [r[0] for r in await conn.fetch("SELECT id FROM posts")] == [post]
                assert [r[0] for r in await conn.fetch("SELECT post_id FROM votes")] == [post]
                assert [r[0] for r in await conn.fetch("SELECT id FROM users")] == [user]
                got = await conn.fetch("SELECT conv_id FROM notifications")
                assert [r[0] for r in got] == [post]
        again = await prune(after, 0)
        assert set(again.rows.values()) == {0}
        # Routing agrees: each row is where the new map looks for it.
        assert after.for_id(moved_post) == 1 and after.for_id(kept_post) == 0
        assert after.for_user(moved_user) == 1 and after.for_user(kept_user) == 0
    finally:
        await after.close()


async def test_a_move_copies_and_prunes_every_table_of_a_shard(dsns: tuple[str, str]) -> None:
    """The tables a move copies (the publication in docs/operations.md) and prune sweeps
    are every table the migrations make, but `schema_migrations`: a table added later and
    left out would stay behind on the old database (reactions, notifications and refused
    events once did)."""
    pools = _pools(dsns, BEFORE)
    try:
        async with pools.connection(0) as conn:
            rows = await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
    finally:
        await pools.close()
    assert {r[0] for r in rows} - {"schema_migrations"} == set(MOVED_TABLES)


NEW_CONV = "INSERT INTO conversations (id, kind, created_by) VALUES ($1, 'group', 'op')"
NOTIFY = (
    "INSERT INTO notifications (user_id, message_id, conv_id, kind, from_user, excerpt, ts)"
    " VALUES ($1, $2, $3, 'mention', 'op', 'hi', 1)"
)


async def _write(pools: ShardPools, physical: int, sql: str, *args: object) -> None:
    async with pools.connection(physical) as conn:
        await conn.execute(sql, *args)


async def test_a_fence_refuses_writes_to_the_moving_range_until_taken_down(
    dsns: tuple[str, str],
) -> None:
    """During the switch a process still on the old map must not write the moving range to
    the old database, where prune would delete it: the fence refuses it there (the client
    is told `unavailable`, a worker holds the record), and nothing else of that range."""
    moving = compose(EPOCH_MS + 1000, 5, 1)
    staying = compose(EPOCH_MS + 1000, 1500, 1)
    pools = _pools(dsns, BEFORE)
    try:
        await _insert(pools, 0, moving, _user_on(range(0, 1024)))
        await _insert(pools, 0, staying, _user_on(range(1024, 2048)))
        await fence(pools, 0, range(0, 1024))
        assert await fenced(pools, 0) == list(range(1024))
        assert await fenced(pools, 1) is None

        new_moving = compose(EPOCH_MS + 2000, 1023, 7)
        refused: list[tuple[str, tuple[object, ...]]] = [
            (NEW_CONV, (new_moving,)),
            ("UPDATE posts SET title = 'x' WHERE id = $1", (moving,)),
            ("DELETE FROM votes WHERE post_id = $1", (moving,)),
            # A row moved into the range by its key, and an upsert into it.
            ("UPDATE posts SET id = $1 WHERE id = $2", (new_moving, staying)),
            (
                "INSERT INTO votes (post_id, user_id, value) VALUES ($1, 'v', 1)"
                " ON CONFLICT (post_id, user_id) DO UPDATE SET value = -1",
                (moving,),
            ),
            # User-keyed rows: PostgreSQL cannot compute the user's shard (blake2b), so
            # every one is refused while the fence stands.
            ("INSERT INTO users (id) VALUES ($1)", (_user_on(range(1024, 2048)),)),
            # An inbox entry lives on its conversation's shard: fenced with it.
            (NOTIFY, (_user_on(range(1024, 2048)), moving, moving)),
        ]
        for sql, args in refused:
            with pytest.raises(ShardUnavailable, match="being moved") as caught:
                await _write(pools, 0, sql, *args)
            assert classify(caught.value) is Fault.TRANSIENT  # a worker holds, never drops
        async with pools.connection(0) as conn:
            assert await conn.fetchval("SELECT title FROM posts WHERE id = $1", moving) == "t"
            assert await conn.fetchval("SELECT count(*) FROM votes WHERE post_id = $1", moving)
            # A refused row inside a transaction rolls the whole transaction back.
            with pytest.raises(asyncpg.PostgresError):
                async with conn.transaction():
                    await conn.execute("UPDATE posts SET title = 'y' WHERE id = $1", staying)
                    await conn.execute("UPDATE posts SET title = 'y' WHERE id = $1", moving)
            assert await conn.fetchval("SELECT title FROM posts WHERE id = $1", staying) == "t"

        # The rest of the old database, and the new one, take writes as before: an inbox
        # entry of a staying conversation too, whoever's it is (the fan-out worker writes
        # them while sequencing; the fence must not hold that database's messages).
        await _write(pools, 0, "UPDATE posts SET title = 'kept' WHERE id = $1", staying)
        await _write(pools, 0, NOTIFY, _user_on(range(0, 1024)), staying, staying)
        await _write(pools, 0, "DELETE FROM votes WHERE post_id = $1", staying)
        await _write(pools, 0, NEW_CONV, compose(EPOCH_MS + 2000, 1024, 7))
        await _write(
            pools,
            1,
            NEW_CONV,
            new_moving,
        )

        # Fencing again replaces the range; taking it down ends it.
        await fence(pools, 0, [5])
        assert await fenced(pools, 0) == [5]
        await _write(pools, 0, NEW_CONV, new_moving)
        assert await unfence(pools, 0) is True
        assert await unfence(pools, 0) is False
        assert await fenced(pools, 0) is None
        await _write(pools, 0, "UPDATE posts SET title = 'moved' WHERE id = $1", moving)
        await _write(pools, 0, "INSERT INTO users (id) VALUES ('after-the-fence')")
        with pytest.raises(ValueError, match="outside"):
            await fence(pools, 0, [4096])
        assert await fenced(pools, 0) is None
    finally:
        await pools.close()


async def _waiting_on(probe: asyncpg.Connection, table: str) -> None:
    """Until some session waits for a lock on `table`."""
    for _ in range(500):
        if await probe.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass", table
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nobody waited for a lock on {table}")


async def test_taking_the_fence_gives_way_to_live_writers_instead_of_deadlocking_them(
    dsns: tuple[str, str],
) -> None:
    """A writer holding `conversations` that then writes `members` (a worker's order) while
    the fence, which locks `members` before `conversations`, waits for it: a deadlock if the
    fence waited as long as PostgreSQL's deadlock check. The fence gives way; the writer
    goes on untouched; the fence stands once the writer is done, or says it could not."""
    conv = compose(EPOCH_MS + 3000, 1500, 1)  # a shard that stays
    pools = _pools(dsns, BEFORE)
    writer = await asyncpg.connect(dsns[0])
    probe = await asyncpg.connect(dsns[0])
    try:
        await _write(pools, 0, NEW_CONV, conv)
        for attempts, writer_done_first in ((2, False), (fence_module.ATTEMPTS, True)):
            tx = writer.transaction()
            await tx.start()
            await writer.execute("UPDATE conversations SET title = 'w' WHERE id = $1", conv)
            taking = asyncio.ensure_future(fence(pools, 0, [5], attempts=attempts))
            await _waiting_on(probe, "conversations")
            # The fence may hold `members` now: the writer waits at most its lock timeout.
            await writer.execute(
                "INSERT INTO members (conv_id, user_id) VALUES ($1, $2)", conv, f"w{attempts}"
            )
            if writer_done_first:
                await tx.commit()
                await taking
                assert await fenced(pools, 0) == [5]
            else:
                with pytest.raises(FenceBusy, match="2 attempts"):
                    await taking
                await tx.commit()
                assert await fenced(pools, 0) is None  # all or nothing: no half fence
        async with pools.connection(0) as conn:
            members = await conn.fetch("SELECT user_id FROM members WHERE conv_id = $1", conv)
        assert sorted(r[0] for r in members) == ["w2", f"w{fence_module.ATTEMPTS}"]
    finally:
        await writer.close()
        await probe.close()
        await pools.close()


async def test_unfence_lifts_at_once_even_while_a_reader_keeps_the_triggers(
    dsns: tuple[str, str],
) -> None:
    pools = _pools(dsns, BEFORE)
    reader = await asyncpg.connect(dsns[0])
    moving = compose(EPOCH_MS + 4000, 5, 1)
    try:
        await fence(pools, 0, [5])
        tx = reader.transaction()
        await tx.start()
        await reader.fetch("SELECT * FROM posts LIMIT 1")  # a long read holds `posts`
        with pytest.raises(FenceBusy, match="lifted"):
            await unfence(pools, 0, attempts=2)
        assert await fenced(pools, 0) is None
        await _write(pools, 0, NEW_CONV, moving)  # writes pass already
        await tx.commit()
        assert await unfence(pools, 0) is True  # now the triggers go
        assert await unfence(pools, 0) is False
        async with pools.connection(0) as conn:
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'agora_shard_fence'"
            )
    finally:
        await reader.close()
        await pools.close()


async def test_the_fence_from_the_command_line(dsns: tuple[str, str]) -> None:
    settings = Settings.from_env({"AGORA_SHARD_DSNS": ",".join(dsns), "AGORA_SHARD_MAP": BEFORE})
    done = agora(settings, "shards", "fence", "--physical", "0", "--range", "0-1023,2000")
    assert done.returncode == 0, done.stderr
    assert "fenced 0-1023,2000" in done.stdout
    status = agora(settings, "shards", "status", "--physical", "0")
    assert "fenced 0-1023,2000" in status.stdout
    assert "no fence" in agora(settings, "shards", "status", "--physical", "1").stdout
    for bad, says in (
        (["fence", "--physical", "0"], "needs --range"),
        (["fence", "--physical", "0", "--range", "9-3"], "empty shard range"),
        (["fence", "--physical", "0", "--range", "a-b"], "not a shard range"),
        (["fence", "--physical", "0", "--range", "4000-4096"], "outside"),
        (["fence", "--physical", "7", "--range", "1"], "no physical shard 7"),
    ):
        refused = agora(settings, "shards", *bad)
        assert refused.returncode == 2 and says in refused.stderr, (bad, refused.stderr)
    # A refused command left the standing fence as it was.
    assert "fenced 0-1023,2000" in agora(settings, "shards", "status", "--physical", "0").stdout
    down = agora(settings, "shards", "unfence", "--physical", "0")
    assert "fence taken down" in down.stdout
    assert "no fence stood" in agora(settings, "shards", "unfence", "--physical", "0").stdout


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    try:
        s.gateway("rs-g1")
        s.fanout("rs-f1")
        yield s
    finally:
        s.stop_all()


async def test_behind_a_fence_a_client_is_told_to_retry_and_an_acked_message_waits(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    """What users see while their shard is fenced: a write the gateway makes itself is
    refused with `unavailable` (retryable), a message is acked (it waits in the broker) and
    delivered once the fence is down, exactly once; another shard of the same database
    takes writes as before."""
    author, member = uid("fa"), uid("fm")
    shard = pools.map.logical_for_user(author)
    physical = pools.map.physical(shard)
    other = next(
        u
        for u in (uid("fo") for _ in range(10_000))
        if pools.map.logical_for_user(u) != shard and pools.for_user(u) == physical
    )
    conv = await create_group(http, stack, g1, author, [member])  # on the author's shard
    reader = await AgoraClient.connect(g1.ws_url, stack.token(member))
    writer = await AgoraClient.connect(g1.ws_url, stack.token(author))
    post = {"title": "behind the fence", "body": "", "community": "moves"}
    try:
        await reader.sub(conv)
        # A gateway's first send to a shard waits for its copy to be stored (send.py:
        # EpochWatch), which the fence would refuse: this one proves the way first.
        first = await writer.send(conv, "before the switch")
        assert [m["id"] for m in await collect(reader, conv, 1, 30)] == [first["id"]]
        await fence(pools, physical, [shard])
        try:
            r = await http.post(f"{g1.http_url}/v1/posts", json=post, headers=auth(stack, author))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "unavailable", r.text
            assert "being moved" in r.json()["error"]["message"]
            r = await http.post(f"{g1.http_url}/v1/posts", json=post, headers=auth(stack, other))
            assert r.status_code == 201, r.text  # same database, another shard
            acked = await writer.send(conv, "sent during the switch")
            worker = stack.procs[1]
            for _ in range(600):  # the worker holds it: its shard refuses the write
                if "being moved" in worker.log_text():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the fan-out worker never met the fence")
        finally:
            await unfence(pools, physical)
        got = await collect(reader, conv, 1, 30)
        assert [m["id"] for m in got] == [acked["id"]]
        assert await collect(reader, conv, 1, 1) == []  # once
        r = await http.post(f"{g1.http_url}/v1/posts", json=post, headers=auth(stack, author))
        assert r.status_code == 201, r.text  # the client's retry, once the fence is down
    finally:
        await reader.close()
        await writer.close()


async def _bodies(pools: ShardPools, conv: str) -> list[tuple[str, int]]:
    async with pools.connection(pools.for_id(int(conv))) as conn:
        rows = await conn.fetch(
            "SELECT body, seq FROM messages WHERE conv_id = $1 ORDER BY seq", int(conv)
        )
    return [(r["body"], r["seq"]) for r in rows]


async def test_a_fence_pauses_only_its_logical_shard_not_the_rest_of_the_database(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    """Behind a move's fence the fan-out worker holds only the fenced logical shard's
    messages: a conversation on another logical shard of the same database is stored and
    delivered while the fence stands (it once waited with the moving range: the worker
    held the whole database's records under one backoff). The held message is stored
    once the fence is down, in its place, and each is delivered exactly once."""
    moving_author, staying_author = uid("ma"), uid("sa")
    shard = pools.map.logical_for_user(moving_author)
    physical = pools.map.physical(shard)
    while not (
        pools.map.logical_for_user(staying_author) != shard
        and pools.for_user(staying_author) == physical
    ):
        staying_author = uid("sa")
    member = uid("mr")
    moving = await create_group(http, stack, g1, moving_author, [member])
    staying = await create_group(http, stack, g1, staying_author, [member])
    assert pools.for_id(int(moving)) == pools.for_id(int(staying)) == physical
    assert shard_of_id(int(moving)) == shard != shard_of_id(int(staying))
    reader = await AgoraClient.connect(g1.ws_url, stack.token(member))
    writers = {
        conv: await AgoraClient.connect(g1.ws_url, stack.token(author))
        for conv, author in ((moving, moving_author), (staying, staying_author))
    }
    worker = stack.procs[1]
    try:
        await reader.sub(moving)
        await reader.sub(staying)
        # The gateways' first send to a shard waits for its copy to be stored (send.py:
        # EpochWatch), which the fence would refuse: these prove the way first.
        first = {conv: (await w.send(conv, "before")) for conv, w in writers.items()}
        got = await collect_each(reader, {moving: 1, staying: 1}, 30)
        assert {c: [m["id"] for m in ms] for c, ms in got.items()} == {
            c: [m["id"]] for c, m in first.items()
        }
        met = worker.log_text().count("being moved")
        await fence(pools, physical, [shard])
        try:
            held = await writers[moving].send(moving, "behind the fence")
            for _ in range(600):  # the worker holds it: its shard refuses the write
                if worker.log_text().count("being moved") > met:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the fan-out worker never met the fence")
            beside = await writers[staying].send(staying, "beside the fence")
            got = await collect_each(reader, {staying: 1}, 15)
            assert [m["id"] for m in got[staying]] == [beside["id"]], "held with the fence"
            assert await _bodies(pools, staying) == [("before", 1), ("beside the fence", 2)]
            assert await _bodies(pools, moving) == [("before", 1)]  # still held
        finally:
            await unfence(pools, physical)
        got = await collect_each(reader, {moving: 1}, 30)
        assert [(m["id"], m["seq"]) for m in got[moving]] == [(held["id"], 2)]
        assert await _bodies(pools, moving) == [("before", 1), ("behind the fence", 2)]
        again = await collect_each(reader, {moving: 1, staying: 1}, 1)
        assert again == {moving: [], staying: []}  # each once
    finally:
        await reader.close()
        for w in writers.values():
            await w.close()


def _shard_file(path: Path, dsns: tuple[str, ...], shard_map: str) -> None:
    tmp = path.with_suffix(".tmp")  # renamed over the old file: never read half-written
    tmp.write_text(f"AGORA_SHARD_DSNS={','.join(dsns)}\nAGORA_SHARD_MAP={shard_map}\n")
    os.replace(tmp, path)


async def _copy_tables(source: str, target: str) -> None:
    """What the move's logical replication does, in one go: every moved table's rows."""
    src, dst = await asyncpg.connect(source), await asyncpg.connect(target)
    try:
        for table in reversed(MOVED_TABLES):  # the tables referred to first
            rows = await src.fetch(f"SELECT * FROM {table}")
            if rows:
                await dst.copy_records_to_table(
                    table, records=[tuple(r) for r in rows], columns=list(rows[0].keys())
                )
    finally:
        await src.close()
        await dst.close()


async def test_a_move_switches_running_processes_without_a_restart(
    settings: Settings, dsns: tuple[str, str], tmp_path: Path
) -> None:
    """The switch of a move with AGORA_SHARD_FILE: the gateways' file first (each says the
    new map in `/readyz`), then the workers'; no process restarts. A message acked behind
    the fence, held by the worker, is stored on the new database and delivered once as
    soon as the worker takes the new map; later ones go there directly, and a client
    resuming from the start reads the conversation's whole history through the new map."""
    tag = secrets.token_hex(3)
    isolated = settings.with_overrides(
        shard_dsns=dsns,
        shard_map=BEFORE,
        kafka_topic_prefix=f"move{tag}",
        redis_prefix=f"move{tag}",
    )
    gateways, workers = tmp_path / "gateways.env", tmp_path / "workers.env"
    for path in (gateways, workers):
        _shard_file(path, dsns, BEFORE)
    stack = Stack(isolated, extra_env={"AGORA_SHARD_FILE": str(gateways)})
    old = _pools(dsns, BEFORE)
    new_version = map_version(dsns, ShardMap.parse(AFTER, 4096, 2))
    try:
        g = stack.gateway(f"mv-g-{tag}")
        stack.extra_env = {"AGORA_SHARD_FILE": str(workers)}
        w = stack.fanout(f"mv-f-{tag}")
        author, member = _user_on(range(0, 1024)), uid("mm")
        async with httpx.AsyncClient(timeout=10) as http:
            conv = await create_group(http, stack, g, author, [member])

            async def readyz() -> str:
                r = await http.get(f"{g.http_url}/readyz")
                return str(r.json()["shard_map"])

            assert old.for_id(int(conv)) == 0 and await readyz() == old.version
            reader = await AgoraClient.connect(g.ws_url, stack.token(member))
            writer = await AgoraClient.connect(g.ws_url, stack.token(author))
            try:
                await reader.sub(conv)
                first = await writer.send(conv, "before the move")
                assert [m["id"] for m in await collect(reader, conv, 1, 30)] == [first["id"]]
                await _copy_tables(dsns[0], dsns[1])
                await fence(old, 0, range(0, 1024))
                try:
                    held = await writer.send(conv, "behind the fence")
                    for _ in range(600):
                        if "being moved" in w.log_text():
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("the fan-out worker never met the fence")
                    switch = time.monotonic()
                    _shard_file(gateways, dsns, AFTER)
                    while await readyz() != new_version:
                        assert time.monotonic() - switch < 10, "the gateway kept its old map"
                        await asyncio.sleep(0.1)
                    _shard_file(workers, dsns, AFTER)
                    got = await collect(reader, conv, 1, 30)
                    took = time.monotonic() - switch
                    assert [m["id"] for m in got] == [held["id"]]
                    print(f"switch: held message delivered {took:.2f} s after the first file")
                    assert "shard map changed" in w.log_text() and w.alive() and g.alive()
                finally:
                    await unfence(old, 0)
                after = await writer.send(conv, "after the move")
                assert [m["id"] for m in await collect(reader, conv, 1, 30)] == [after["id"]]
                assert await collect(reader, conv, 1, 1) == []  # each once
                # Stored where the new map says, the old copy frozen at the fence.
                everything = ["before the move", "behind the fence", "after the move"]
                for physical, bodies in ((1, everything), (0, everything[:1])):
                    async with old.connection(physical) as conn:
                        rows = await conn.fetch(
                            "SELECT body FROM messages WHERE conv_id = $1 ORDER BY seq", int(conv)
                        )
                    assert [r["body"] for r in rows] == bodies, physical
                again = await AgoraClient.connect(g.ws_url, stack.token(member))
                try:
                    await again.sub(conv, since=0)
                    history = await collect(again, conv, 3, 30)
                    assert [m["body"] for m in history] == [
                        "before the move",
                        "behind the fence",
                        "after the move",
                    ]
                    assert [m["seq"] for m in history] == [1, 2, 3]
                finally:
                    await again.close()
            finally:
                await reader.close()
                await writer.close()
    finally:
        stack.stop_all()
        await old.close()
