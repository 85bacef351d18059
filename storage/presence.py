"""What presence needs from PostgreSQL: the direct conversations and groups a user (or
several users of one shard) is in, with their sizes (one query on the users' shard, then
one per conversation shard)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from storage.pools import ShardPools


async def shared_many(
    pools: ShardPools, physical: int, users: list[str], limit: int = 5000
) -> list[list[tuple[int, int]]]:
    """For each of `users` (all of physical shard `physical`), in the order asked:
    [(conversation, members)] of the direct conversations and groups they are in (at most
    `limit` looked at per user). One query on that shard, then one per shard of their
    conversations, however many users: presence reads those coming online together at
    once (gateway/presence.py)."""
    async with pools.connection(physical) as conn:
        rows = await conn.fetch(
            """SELECT u.user_id, uc.conv_id FROM unnest($1::text[]) AS u(user_id)
               CROSS JOIN LATERAL (SELECT conv_id FROM user_conversations
                                   WHERE user_id = u.user_id LIMIT $2) uc""",
            sorted(set(users)),
            limit,
        )
    by_shard: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for r in rows:
        by_shard[pools.for_id(r["conv_id"])].append((r["conv_id"], r["user_id"]))

    async def one(shard: int, pairs: list[tuple[int, str]]) -> list[Any]:
        async with pools.connection(shard) as conn:
            found: list[Any] = await conn.fetch(
                """SELECT k.user_id, c.id,
                          (SELECT count(*) FROM members x WHERE x.conv_id = c.id) AS n
                   FROM unnest($1::bigint[], $2::text[]) AS k(conv_id, user_id)
                   JOIN conversations c ON c.id = k.conv_id AND c.kind IN ('direct', 'group')
                   JOIN members m ON m.conv_id = c.id AND m.user_id = k.user_id""",
                [c for c, _ in pairs],
                [u for _, u in pairs],
            )
        return found

    parts = await asyncio.gather(*(one(p, pairs) for p, pairs in by_shard.items()))
    rooms: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for part in parts:
        for r in part:
            rooms[r["user_id"]].append((r["id"], r["n"]))
    return [rooms.get(u, []) for u in users]


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
