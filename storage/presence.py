"""What presence needs from PostgreSQL: the direct conversations and groups a user is in,
with their sizes (one query on the user's shard, then one per conversation shard)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from storage.pools import ShardPools


async def shared(pools: ShardPools, user: str, limit: int = 5000) -> list[tuple[int, int]]:
    """[(conversation, members)] of the direct conversations and groups `user` is in."""
    async with pools.connection(pools.for_user(user)) as conn:
        rows = await conn.fetch(
            "SELECT conv_id FROM user_conversations WHERE user_id = $1 LIMIT $2", user, limit
        )
    by_shard: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        by_shard[pools.for_id(r["conv_id"])].append(r["conv_id"])

    async def one(physical: int, convs: list[int]) -> list[Any]:
        async with pools.connection(physical) as conn:
            found: list[Any] = await conn.fetch(
                """SELECT c.id, (SELECT count(*) FROM members x WHERE x.conv_id = c.id) AS n
                   FROM conversations c
                   JOIN members m ON m.conv_id = c.id AND m.user_id = $2
                   WHERE c.id = ANY($1::bigint[]) AND c.kind IN ('direct', 'group')""",
                convs,
                user,
            )
        return found

    parts = await asyncio.gather(*(one(p, c) for p, c in by_shard.items()))
    return [(r["id"], r["n"]) for part in parts for r in part]


async def members_page(pools: ShardPools, conv: int, after: str | None, limit: int) -> list[str]:
    """Members of `conv` by user id, after `after` (keyset), at most `limit`."""
    async with pools.connection(pools.for_id(conv)) as conn:
        rows = await conn.fetch(
            """SELECT user_id FROM members WHERE conv_id = $1
                 AND ($2::text IS NULL OR user_id > $2)
               ORDER BY user_id LIMIT $3""",
            conv,
            after,
            limit,
        )
    return [r["user_id"] for r in rows]
