"""Read pointers: per member, the last seq they have read, only ever moving forward.

A pointer lives on the member's row (the conversation's shard). `mark` moves it to
min(seq, the conversation's last seq) when that is further, in one statement whose
`read_seq < wanted` condition PostgreSQL re-checks on the locked row, so two devices
moving it at once leave the larger value, never a smaller one. `unread` counts the texts
and comments of others after the pointer (events are not messages to read).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from storage.pools import ShardPools

MAX_UNREAD = 1000  # counted up to this (a badge shows "999+" long before)


@dataclass(frozen=True, slots=True)
class Marked:
    seq: int  # the pointer now
    moved: bool  # this call moved it
    kind: str  # the conversation's kind
    members: int  # how many members it has


async def mark(pools: ShardPools, conv: int, user: str, seq: int) -> Marked | None:
    """Move `user`'s pointer in `conv` to `seq` if further; None when not a member."""
    async with pools.connection(pools.for_id(conv)) as conn:
        row = await conn.fetchrow(
            """WITH target AS (
                   SELECT m.read_seq AS old, LEAST($3::bigint, c.last_seq) AS wanted,
                          c.kind,
                          (SELECT count(*) FROM members x WHERE x.conv_id = $1) AS members
                   FROM members m JOIN conversations c ON c.id = m.conv_id
                   WHERE m.conv_id = $1 AND m.user_id = $2
               ), moved AS (
                   UPDATE members m SET read_seq = t.wanted FROM target t
                   WHERE m.conv_id = $1 AND m.user_id = $2 AND m.read_seq < t.wanted
                   RETURNING m.read_seq
               )
               SELECT t.old, t.kind, t.members, (SELECT read_seq FROM moved) AS new
               FROM target t""",
            conv,
            user,
            seq,
        )
        if row is None:
            return None
        if row["new"] is not None:
            return Marked(row["new"], True, row["kind"], row["members"])
        # Not moved: someone (another device) may have moved it further meanwhile.
        now = await conn.fetchval(
            "SELECT read_seq FROM members WHERE conv_id = $1 AND user_id = $2", conv, user
        )
    return Marked(max(now or 0, row["old"]), False, row["kind"], row["members"])


async def unread(pools: ShardPools, user: str, convs: list[int]) -> dict[int, tuple[int, int]]:
    """{conv: (read_seq, unread)} for `user`'s memberships among `convs`: one query per
    physical shard, shards in parallel."""
    by_shard: dict[int, list[int]] = defaultdict(list)
    for conv in convs:
        by_shard[pools.for_id(conv)].append(conv)

    async def one(physical: int, group: list[int]) -> list[Any]:
        async with pools.connection(physical) as conn:
            rows: list[Any] = await conn.fetch(
                """SELECT m.conv_id, m.read_seq,
                          (SELECT count(*) FROM (
                               SELECT 1 FROM messages x
                               WHERE x.conv_id = m.conv_id AND x.seq > m.read_seq
                                 AND x.kind IN ('text', 'comment') AND x.sender <> $2
                               LIMIT $3) s) AS unread
                   FROM members m
                   WHERE m.conv_id = ANY($1::bigint[]) AND m.user_id = $2""",
                group,
                user,
                MAX_UNREAD,
            )
        return rows

    parts = await asyncio.gather(*(one(p, g) for p, g in by_shard.items()))
    return {r["conv_id"]: (r["read_seq"], r["unread"]) for part in parts for r in part}


async def pointers(pools: ShardPools, conv: int) -> list[tuple[str, int]]:
    """Every member's pointer in `conv`: [(user, read_seq)] by user."""
    async with pools.connection(pools.for_id(conv)) as conn:
        rows = await conn.fetch(
            "SELECT user_id, read_seq FROM members WHERE conv_id = $1 ORDER BY user_id", conv
        )
    return [(r["user_id"], r["read_seq"]) for r in rows]
