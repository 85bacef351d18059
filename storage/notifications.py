"""The notification inbox: mentions, replies, and direct messages that found their
recipient offline.

Mentions and replies are derived where a message is sequenced (`derive`, called by
`storage.messages.append_batch` in its transaction), so each is written exactly once, on
the conversation's shard, whatever Kafka redelivers: `@user` of a member (not the sender
themselves), and a reply to someone else's message. A direct message is written by the
fan-out worker after publishing, only when its recipient had no connection (`add_dms`,
idempotent). A user's inbox spans the physical shards: `page` reads each and merges by
id (message ids are time-ordered), keyset-paged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from core.errors import NotFound
from storage.models import Message
from storage.pools import ShardPools

MENTION = re.compile(r"(?<![A-Za-z0-9_.:-])@([A-Za-z0-9_.:-]{1,64})")
EXCERPT_CHARS = 140
MAX_MENTIONS = 20  # per message: a wall of @names notifies the first 20


@dataclass(frozen=True, slots=True)
class Notification:
    user: str
    message: int
    conv: int
    kind: str  # mention | reply | dm
    sender: str
    excerpt: str
    ts: int
    read: bool = False


def mentioned(body: str) -> list[str]:
    """The user ids `@named` in `body`, in order, each once (pure). A trailing `.` or `:`
    ends a sentence, not a name."""
    out: list[str] = []
    for name in MENTION.findall(body):
        name = name.rstrip(".:")
        if name and name not in out:
            out.append(name)
    return out[:MAX_MENTIONS]


def excerpt(body: str) -> str:
    return body if len(body) <= EXCERPT_CHARS else body[: EXCERPT_CHARS - 1] + "…"


async def derive(conn: Any, stored: list[Message], kinds: dict[int, str]) -> list[Message]:
    """Write the mention and reply notifications of `stored` (in the sequencing
    transaction; `kinds`: each conversation's kind); returns `stored` with each message's
    `notify` and `dm_to` set. Reads only what a batch needs: the members a text @names,
    the two members of a direct conversation, the authors of the messages replied to (a
    batch of a big room's plain messages costs no query at all)."""
    texts = [m for m in stored if m.kind in ("text", "comment")]
    named = {m.id: mentioned(m.body) for m in texts if "@" in m.body}
    direct = sorted({m.conv for m in texts if kinds.get(m.conv) == "direct"})
    replied = sorted({m.reply_to for m in texts if m.reply_to is not None})
    if not named and not direct and not replied:
        return stored
    by_id = {m.id: m for m in texts}
    wanted = [(by_id[i].conv, user) for i, users in named.items() for user in users]
    rows = await conn.fetch(
        """SELECT m.conv_id, m.user_id FROM members m
           WHERE m.conv_id = ANY($1::bigint[])
              OR (m.conv_id, m.user_id) IN (SELECT * FROM unnest($2::bigint[], $3::text[]))""",
        direct,
        [c for c, _ in wanted],
        [u for _, u in wanted],
    )
    members: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        members[r["conv_id"]].add(r["user_id"])
    authors: dict[int, str] = {}
    if replied:
        for r in await conn.fetch(
            "SELECT id, sender FROM messages WHERE id = ANY($1::bigint[])", replied
        ):
            authors[r["id"]] = r["sender"]
        # A reply to a message of the same batch: its author is in the batch.
        authors.update({m.id: m.sender for m in stored if m.id in replied})
    out: list[Notification] = []
    marked: dict[int, Message] = {}
    for m in texts:
        whom: dict[str, str] = {}
        author = authors.get(m.reply_to) if m.reply_to is not None else None
        if author is not None and author != m.sender:
            whom[author] = "reply"  # a reply that also @names its author is a reply
        for user in named.get(m.id, ()):
            if user in members[m.conv] and user != m.sender:
                whom.setdefault(user, "mention")
        dm_to = None
        if kinds.get(m.conv) == "direct":
            others = members[m.conv] - {m.sender}
            dm_to = next(iter(others)) if len(others) == 1 else None
        if whom or dm_to:
            marked[m.id] = dataclasses.replace(m, notify=tuple(whom.items()), dm_to=dm_to)
        for user, kind in whom.items():
            out.append(Notification(user, m.id, m.conv, kind, m.sender, excerpt(m.body), m.ts))
    if out:
        await _insert(conn, out)
    return [marked.get(m.id, m) for m in stored]


async def mark_direct(conn: Any, messages: list[Message]) -> list[Message]:
    """`messages` (stored earlier) with `dm_to` set on those of direct conversations, as
    `derive` set it when they were stored. One query, only when there are texts."""
    texts = {m.conv for m in messages if m.kind in ("text", "comment")}
    if not texts:
        return messages
    members: dict[int, set[str]] = defaultdict(set)
    for r in await conn.fetch(
        """SELECT m.conv_id, m.user_id FROM members m JOIN conversations c ON c.id = m.conv_id
           WHERE c.kind = 'direct' AND c.id = ANY($1::bigint[])""",
        sorted(texts),
    ):
        members[r["conv_id"]].add(r["user_id"])
    return with_dm_to(messages, members)


def with_dm_to(messages: list[Message], direct: dict[int, set[str]]) -> list[Message]:
    """`messages` with `dm_to` set on the texts (not deleted) of direct conversations, to
    the one member other than the sender; `direct`: the members of each direct conversation
    (other conversations left out). Pure: what `mark_direct` and the one-statement path
    (storage/onetrip.py) apply to the members they read."""
    out = []
    for m in messages:
        others = direct.get(m.conv, set()) - {m.sender}
        if m.kind in ("text", "comment") and not m.deleted and len(others) == 1:
            m = dataclasses.replace(m, dm_to=next(iter(others)))
        out.append(m)
    return out


async def _insert(conn: Any, rows: list[Notification]) -> None:
    await conn.execute(
        """INSERT INTO notifications
               (user_id, message_id, conv_id, kind, from_user, excerpt, ts)
           SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[],
                                $5::text[], $6::text[], $7::bigint[])
           ON CONFLICT DO NOTHING""",
        [n.user for n in rows],
        [n.message for n in rows],
        [n.conv for n in rows],
        [n.kind for n in rows],
        [n.sender for n in rows],
        [n.excerpt for n in rows],
        [n.ts for n in rows],
    )


def dm_of(m: Message) -> Notification | None:
    """The `dm` entry of a direct message for its recipient (None: not a direct one)."""
    if m.dm_to is None or any(user == m.dm_to for user, _ in m.notify):
        return None  # a mention or reply of them is in the inbox already
    return Notification(m.dm_to, m.id, m.conv, "dm", m.sender, excerpt(m.body), m.ts)


async def add_dms(pools: ShardPools, rows: list[Notification]) -> None:
    """Keep direct messages for recipients who were offline (idempotent)."""
    by_shard: dict[int, list[Notification]] = defaultdict(list)
    for n in rows:
        by_shard[pools.for_id(n.conv)].append(n)

    async def one(physical: int, group: list[Notification]) -> None:
        async with pools.connection(physical) as conn:
            await _insert(conn, group)

    await asyncio.gather(*(one(p, g) for p, g in by_shard.items()))


def _row(r: Any) -> Notification:
    return Notification(
        r["user_id"],
        r["message_id"],
        r["conv_id"],
        r["kind"],
        r["from_user"],
        r["excerpt"],
        r["ts"],
        r["read_at"] is not None,
    )


async def page(
    pools: ShardPools, user: str, before: int | None, limit: int, unread_only: bool
) -> list[Notification]:
    """`user`'s notifications newest first, id < before, at most `limit`: each physical
    shard's newest `limit`, merged."""

    async def one(physical: int) -> list[Any]:
        async with pools.connection(physical) as conn:
            rows: list[Any] = await conn.fetch(
                """SELECT * FROM notifications
                   WHERE user_id = $1 AND ($2::bigint IS NULL OR message_id < $2)
                     AND (NOT $4 OR read_at IS NULL)
                   ORDER BY message_id DESC LIMIT $3""",
                user,
                before,
                limit,
                unread_only,
            )
        return rows

    parts = await asyncio.gather(*(one(p) for p in range(pools.physical_count)))
    merged = sorted((_row(r) for part in parts for r in part), key=lambda n: -n.message)
    return merged[:limit]


async def mark_read(pools: ShardPools, user: str, ids: list[int] | None, now: int) -> int:
    """Mark `ids` (None: all) of `user` read; how many changed."""

    async def one(physical: int, group: list[int] | None) -> int:
        async with pools.connection(physical) as conn:
            status: str = await conn.execute(
                """UPDATE notifications SET read_at = $3
                   WHERE user_id = $1 AND read_at IS NULL
                     AND ($2::bigint[] IS NULL OR message_id = ANY($2::bigint[]))""",
                user,
                group,
                now,
            )
        return int(status.split()[-1])

    if ids is None:
        counts = await asyncio.gather(*(one(p, None) for p in range(pools.physical_count)))
    else:
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i in ids:
            try:
                by_shard[pools.for_id(i)].append(i)
            except NotFound:
                continue  # an id naming no shard names no notification either
        counts = await asyncio.gather(*(one(p, g) for p, g in by_shard.items()))
    return sum(counts)


async def unread_count(pools: ShardPools, user: str, cap: int = 1000) -> int:
    async def one(physical: int) -> int:
        async with pools.connection(physical) as conn:
            n: int = await conn.fetchval(
                """SELECT count(*) FROM (SELECT 1 FROM notifications
                   WHERE user_id = $1 AND read_at IS NULL LIMIT $2) s""",
                user,
                cap,
            )
        return n

    return min(cap, sum(await asyncio.gather(*(one(p) for p in range(pools.physical_count)))))
