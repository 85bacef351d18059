"""Moving logical shards to another physical database: after the copy and the map switch,
`agora shards prune` removes exactly the rows each database no longer owns."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from core.settings import Settings
from devstack import services
from storage.ids import EPOCH_MS, compose
from storage.migrate import migrate_all
from storage.pools import ShardPools
from storage.reshard import MOVED_TABLES, prune
from storage.shards import shard_for_user
from tests.engines import PG

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
            "notifications": 0, "users": 1,
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
