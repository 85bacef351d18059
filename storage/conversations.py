"""Conversations and memberships.

A conversation and its members live on the shard inside the conversation id. Each member's
list of conversations (`user_conversations`) lives on the member's own shard and is written
after the membership, so a crash in between leaves an index row missing;
`repair_user_index` re-derives it from the conversation's side. A removal deletes the
membership first, then the index row: a failure in between (a crash, the member's shard
down or fenced for a move) leaves an index row without a membership, which lists skip
(they keep only memberships that hold on the conversation's side).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import asyncpg

from storage.ids import IdGenerator
from storage.models import Conversation
from storage.pools import ShardPools

_MAX_CREATE_ATTEMPTS = 5


def direct_key(a: str, b: str) -> str:
    """Order-independent key of the direct conversation between two users."""
    lo, hi = sorted((a, b))
    return f"{len(lo)}:{lo}|{hi}"


def _ms(ts: Any) -> int:
    return int(ts.timestamp() * 1000) if ts is not None else 0


def _row_to_conversation(row: Any, members: Iterable[str]) -> Conversation:
    created = _ms(row["created_at"])
    return Conversation(
        id=row["id"],
        kind=row["kind"],
        title=row["title"],
        created_by=row["created_by"],
        created_at_ms=created,
        members=tuple(sorted(members)),
        last_seq=row["last_seq"],
        last_activity_ms=row.get("activity_ms") or _ms(row["last_message_at"]) or created,
    )


async def _index_members(pools: ShardPools, conv_id: int, users: Iterable[str]) -> None:
    """Write the user-side index rows, one statement per physical shard, in parallel."""
    by_shard: dict[int, list[str]] = defaultdict(list)
    for user in users:
        by_shard[pools.for_user(user)].append(user)

    async def write(physical: int, group: list[str]) -> None:
        async with pools.connection(physical) as conn:
            await conn.execute(
                """INSERT INTO user_conversations (user_id, conv_id)
                   SELECT u, $2 FROM unnest($1::text[]) AS u
                   ON CONFLICT DO NOTHING""",
                group,
                conv_id,
            )

    await asyncio.gather(*(write(p, g) for p, g in by_shard.items()))


async def create_group(
    pools: ShardPools, ids: IdGenerator, creator: str, members: Iterable[str], title: str
) -> Conversation:
    everyone = sorted({creator, *members})
    logical = pools.map.logical_for_user(creator)
    physical = pools.map.physical(logical)
    for attempt in range(_MAX_CREATE_ATTEMPTS):
        conv_id = ids.next_id(logical)
        try:
            async with pools.transaction(physical) as conn:
                row = await conn.fetchrow(
                    """INSERT INTO conversations (id, kind, title, created_by)
                       VALUES ($1, 'group', $2, $3) RETURNING *""",
                    conv_id,
                    title,
                    creator,
                )
                await conn.execute(
                    """INSERT INTO members (conv_id, user_id)
                       SELECT $1, u FROM unnest($2::text[]) AS u""",
                    conv_id,
                    everyone,
                )
            break
        except asyncpg.UniqueViolationError:
            # Another process made the same id in the same ms for this shard: take another.
            if attempt == _MAX_CREATE_ATTEMPTS - 1:
                raise
    await _index_members(pools, conv_id, everyone)
    return _row_to_conversation(row, everyone)


async def create_direct(
    pools: ShardPools, ids: IdGenerator, a: str, b: str
) -> tuple[Conversation, bool]:
    """The direct conversation of a and b: (conversation, created_now).

    It lives on the shard of the smaller user id, where a unique key on the pair makes a
    second creation (even a concurrent one) return the first.
    """
    key = direct_key(a, b)
    owner = min(a, b)
    logical = pools.map.logical_for_user(owner)
    physical = pools.map.physical(logical)
    created = False
    async with pools.transaction(physical) as conn:
        row = await conn.fetchrow("SELECT * FROM conversations WHERE direct_key = $1", key)
        if row is None:
            conv_id = ids.next_id(logical)
            row = await conn.fetchrow(
                """INSERT INTO conversations (id, kind, title, created_by, direct_key)
                   VALUES ($1, 'direct', '', $2, $3)
                   ON CONFLICT (direct_key) DO NOTHING RETURNING *""",
                conv_id,
                a,
                key,
            )
            if row is None:  # lost a race with a concurrent creator: theirs stands
                row = await conn.fetchrow("SELECT * FROM conversations WHERE direct_key = $1", key)
            else:
                created = True
                await conn.execute(
                    """INSERT INTO members (conv_id, user_id)
                       SELECT $1, u FROM unnest($2::text[]) AS u ON CONFLICT DO NOTHING""",
                    conv_id,
                    sorted({a, b}),
                )
    assert row is not None
    # Also on a repeat: repairs the index if an earlier creation died before this step.
    await _index_members(pools, row["id"], {a, b})
    return _row_to_conversation(row, {a, b}), created


async def create_thread(
    pools: ShardPools, conn: Any, conv_id: int, author: str, title: str
) -> None:
    """Insert a post's public thread conversation on `conn` (the post's shard, same tx)."""
    await conn.execute(
        """INSERT INTO conversations (id, kind, title, created_by)
           VALUES ($1, 'thread', $2, $3)""",
        conv_id,
        title[:300],
        author,
    )


async def get_conversation(
    pools: ShardPools, conv_id: int, *, open_only: bool = False
) -> Conversation | None:
    """The conversation with its members; with `open_only`, None when it is closed (the
    thread of a deleted post) as when it does not exist."""
    closed = " AND closed_at IS NULL" if open_only else ""
    async with pools.connection(pools.for_id(conv_id)) as conn:
        row = await conn.fetchrow("SELECT * FROM conversations WHERE id = $1" + closed, conv_id)
        if row is None:
            return None
        members = await conn.fetch(
            "SELECT user_id FROM members WHERE conv_id = $1 ORDER BY user_id", conv_id
        )
    return _row_to_conversation(row, (m["user_id"] for m in members))


async def access(pools: ShardPools, conv_id: int, user: str) -> tuple[str, bool] | None:
    """(kind, is_member) for `user` in `conv_id`, or None when there is no such conversation
    (or it is closed: the thread of a deleted post)."""
    async with pools.connection(pools.for_id(conv_id)) as conn:
        row = await conn.fetchrow(
            """SELECT c.kind, EXISTS (SELECT 1 FROM members m
                                      WHERE m.conv_id = c.id AND m.user_id = $2) AS member
               FROM conversations c WHERE c.id = $1 AND c.closed_at IS NULL""",
            conv_id,
            user,
        )
    if row is None:
        return None
    return row["kind"], row["member"]


async def allowed_among(pools: ShardPools, conv_id: int, users: Iterable[str]) -> set[str]:
    """Which of `users` may still use `conv_id` (members, or anyone for an open thread);
    none when it is closed or gone. One query, for re-checking a node's subscribers."""
    wanted = sorted(set(users))
    async with pools.connection(pools.for_id(conv_id)) as conn:
        row = await conn.fetchrow(
            "SELECT kind FROM conversations WHERE id = $1 AND closed_at IS NULL", conv_id
        )
        if row is None:
            return set()
        if row["kind"] == "thread":
            return set(wanted)
        rows = await conn.fetch(
            "SELECT user_id FROM members WHERE conv_id = $1 AND user_id = ANY($2::text[])",
            conv_id,
            wanted,
        )
    return {r["user_id"] for r in rows}


async def add_member(pools: ShardPools, conv_id: int, user: str) -> bool:
    """Add `user`; False when already a member."""
    async with pools.connection(pools.for_id(conv_id)) as conn:
        status = await conn.execute(
            "INSERT INTO members (conv_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            conv_id,
            user,
        )
    await _index_members(pools, conv_id, [user])
    return bool(status.endswith(" 1"))


async def remove_member(pools: ShardPools, conv_id: int, user: str) -> bool:
    """Remove `user`; False when not a member. Conversation side first, then the index."""
    async with pools.connection(pools.for_id(conv_id)) as conn:
        status = await conn.execute(
            "DELETE FROM members WHERE conv_id = $1 AND user_id = $2", conv_id, user
        )
    async with pools.connection(pools.for_user(user)) as conn:
        await conn.execute(
            "DELETE FROM user_conversations WHERE user_id = $1 AND conv_id = $2", user, conv_id
        )
    return bool(status.endswith(" 1"))


MAX_LISTED = 5000  # conversations of one user the list reaches (their ids are read whole)
# ms since the epoch of a conversation's last activity, computed once in SQL so the order
# and the cursor compare exactly the numbers the client sees.
_ACTIVITY_MS = "floor(extract(epoch FROM coalesce(c.last_message_at, c.created_at)) * 1000)"


async def list_for_user(
    pools: ShardPools, user: str, limit: int = MAX_LISTED, after: tuple[int, int] | None = None
) -> list[Conversation]:
    """Up to `limit` of the user's conversations, most recently active first (ties: newer
    id first), after the key (last_activity_ms, id) `after` when given.

    Reads the conversation ids from the index on the user's shard, then, on each
    conversation shard in parallel, at most `limit` rows in key order past the cursor
    (keyset paging in SQL, keeping only memberships that still hold on the conversation's
    side), merges them and loads the members of the page only.
    """
    async with pools.connection(pools.for_user(user)) as conn:
        rows = await conn.fetch(
            "SELECT conv_id FROM user_conversations WHERE user_id = $1 LIMIT $2",
            user,
            MAX_LISTED,
        )
    by_shard: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        by_shard[pools.for_id(r["conv_id"])].append(r["conv_id"])
    key = after if after is not None else (None, None)

    async def fetch(physical: int, conv_ids: list[int]) -> list[Any]:
        async with pools.connection(physical) as conn:
            return list(
                await conn.fetch(
                    f"""SELECT c.*, {_ACTIVITY_MS}::bigint AS activity_ms
                        FROM conversations c
                        JOIN members m ON m.conv_id = c.id AND m.user_id = $2
                        WHERE c.id = ANY($1::bigint[])
                          AND ($3::bigint IS NULL OR ({_ACTIVITY_MS}, c.id) < ($3, $4))
                        ORDER BY {_ACTIVITY_MS} DESC, c.id DESC
                        LIMIT $5""",
                    conv_ids,
                    user,
                    key[0],
                    key[1],
                    limit,
                )
            )

    parts = await asyncio.gather(*(fetch(p, c) for p, c in by_shard.items()))
    page = sorted(
        (row for part in parts for row in part),
        key=lambda r: (r["activity_ms"], r["id"]),
        reverse=True,
    )[:limit]
    page_by_shard: dict[int, list[int]] = defaultdict(list)
    for row in page:
        page_by_shard[pools.for_id(row["id"])].append(row["id"])

    async def members_of(physical: int, conv_ids: list[int]) -> list[Any]:
        async with pools.connection(physical) as conn:
            return list(
                await conn.fetch(
                    "SELECT conv_id, user_id FROM members WHERE conv_id = ANY($1::bigint[])",
                    conv_ids,
                )
            )

    found = await asyncio.gather(*(members_of(p, c) for p, c in page_by_shard.items()))
    members: dict[int, list[str]] = defaultdict(list)
    for part in found:
        for m in part:
            members[m["conv_id"]].append(m["user_id"])
    return [_row_to_conversation(row, members[row["id"]]) for row in page]


async def repair_user_index(pools: ShardPools, conv_id: int) -> None:
    """Re-derive the user-side index rows of one conversation from its membership."""
    conv = await get_conversation(pools, conv_id)
    if conv is not None:
        await _index_members(pools, conv_id, conv.members)
