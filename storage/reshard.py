"""After moving logical shards to another physical database: remove the rows that the
shard map no longer routes to this one (`agora shards prune`).

A move copies whole tables (PostgreSQL logical replication, or a dump) and then switches
AGORA_SHARD_MAP, so both databases hold the moved rows for a while. Reads by id or user
go to the right one, but scatter-gather reads (feed rebuilds read every shard's top posts)
would see a moved post twice: pruning deletes, on each physical database, every row whose
logical shard maps elsewhere. Id-keyed rows carry the logical shard inside the id
(computed in SQL); user-keyed rows live on the shard of a hash of the user id (blake2b,
computed here in batches, since PostgreSQL has no blake2b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.ids import SEQ_BITS, SHARD_MASK
from storage.pools import ShardPools

# (table, id column) for rows on the shard inside an id; children before parents. The
# notification inbox is keyed by user but lives on the *conversation's* shard (written in
# the transaction that sequences the message: storage/notifications.py), so it moves, is
# pruned and is fenced with its conversation.
ID_KEYED = (
    ("reactions", "conv_id"),
    ("refused_events", "conv_id"),
    ("notifications", "conv_id"),
    ("messages", "conv_id"),
    ("members", "conv_id"),
    ("conversations", "id"),
    ("votes", "post_id"),
    ("posts", "id"),
)
# (table, user column) for rows on the shard of the user id's hash.
USER_KEYED = (("user_conversations", "user_id"), ("users", "id"))
# What a move copies (docs/operations.md: the publication) and prune sweeps: every table of
# a shard database but `schema_migrations`, which `agora migrate` fills on each. A table a
# migration adds must be placed in one of the lists above (test_reshard.py checks).
MOVED_TABLES = tuple(table for table, _ in (*ID_KEYED, *USER_KEYED))
USER_BATCH = 5000


@dataclass(frozen=True)
class PruneResult:
    physical: int
    rows: dict[str, int]  # table -> rows that belong elsewhere (deleted unless a dry run)


def _logical_of(column: str) -> str:
    return f"(({column} >> {SEQ_BITS}) & {SHARD_MASK})"


async def prune(pools: ShardPools, physical: int, dry_run: bool = True) -> PruneResult:
    """Rows on `physical` that the current map routes to another database: counted, and
    deleted when not `dry_run`. Safe to run again; run it only after the map switched."""
    shard_map = pools.map
    here = [s for s in range(shard_map.logical_shards) if shard_map.physical(s) == physical]
    counts: dict[str, int] = {}
    async with pools.connection(physical) as conn:
        for table, column in ID_KEYED:
            where = f"NOT {_logical_of(column)} = ANY($1::int[])"
            if dry_run:
                n = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {where}", here)
            else:
                status = await conn.execute(f"DELETE FROM {table} WHERE {where}", here)
                n = int(status.split()[-1])
            counts[table] = int(n)
        for table, column in USER_KEYED:
            counts[table] = await _prune_users(pools, conn, table, column, physical, dry_run)
    return PruneResult(physical, counts)


async def _prune_users(
    pools: ShardPools, conn: Any, table: str, column: str, physical: int, dry_run: bool
) -> int:
    total = 0
    after = ""
    while True:
        users: list[str] = [
            r[0]
            for r in await conn.fetch(
                f"SELECT DISTINCT {column} FROM {table} WHERE {column} > $1 "
                f"ORDER BY {column} LIMIT {USER_BATCH}",
                after,
            )
        ]
        if not users:
            return total
        after = users[-1]
        gone = [u for u in users if pools.map.for_user(u) != physical]
        if gone:
            sql = "SELECT count(*)" if dry_run else "DELETE"
            query = f"{sql} FROM {table} WHERE {column} = ANY($1::text[])"
            if dry_run:
                total += int(await conn.fetchval(query, gone))
            else:
                status = await conn.execute(query, gone)
                total += int(status.split()[-1])
