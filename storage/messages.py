"""Messages: the sequencing write used by fan-out workers, and the history reads.

`append_batch` runs inside one transaction on one physical shard and assigns each
conversation's next seqs from `conversations.last_seq`, the source of truth, so no seq is
ever reused, even if Redis is lost. A message already stored (a Kafka redelivery, or a
producer retry) keeps its first seq and is reported as such, never re-sequenced.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from storage import events, notifications
from storage.models import Message, NewMessage
from storage.pools import ShardPools


def first_of_each(batch: list[NewMessage]) -> list[NewMessage]:
    """`batch` without in-batch repeats of the same (conv, sender, cid): the first one
    wins, in batch order. Pure."""
    unique: dict[tuple[int, str, str], NewMessage] = {}
    for m in batch:
        unique.setdefault((m.conv, m.sender, m.cid), m)
    return list(unique.values())


async def append_batch(
    conn: Any, batch: list[NewMessage]
) -> tuple[list[Message], list[Message], list[NewMessage]]:
    """Sequence and insert `batch` on `conn` (all on its shard, inside a transaction).

    Returns (stored_now, already_stored, orphans): `already_stored` holds the earlier rows of
    redelivered messages (with their original seq); `orphans` are messages whose
    conversation does not exist on this shard (dropped).
    """
    items = first_of_each(batch)
    if not items:
        return [], [], []

    existing_rows = await conn.fetch(
        _STORED_ROWS,
        [m.conv for m in items],
        [m.sender for m in items],
        [m.cid for m in items],
    )
    # A redelivered direct message gets its recipient again: its inbox entry is written
    # after the commit (fanout/notify.py), so a worker that failed or died in between must
    # be able to write it on the retry.
    already = await notifications.mark_direct(conn, [_row_to_message(r) for r in existing_rows])
    seen = {(m.conv, m.sender, m.cid) for m in already}
    fresh = [m for m in items if (m.conv, m.sender, m.cid) not in seen]
    if not fresh:
        return [], already, []
    # Edits, deletes and reactions take effect here, in the order they get their seqs.
    outcome = await events.apply(conn, fresh)
    fresh, overrides = outcome.keep, outcome.overrides
    if not fresh:
        return [], already, []

    per_conv: dict[int, list[NewMessage]] = defaultdict(list)
    for m in fresh:
        per_conv[m.conv].append(m)
    conv_ids = sorted(per_conv)  # a fixed lock order: concurrent batches cannot deadlock
    rows = await conn.fetch(
        """UPDATE conversations c
           SET last_seq = c.last_seq + v.n,
               last_message_at = to_timestamp(v.ts / 1000.0)
           FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS v(id, n, ts)
           WHERE c.id = v.id
           RETURNING c.id, c.last_seq, c.kind""",
        conv_ids,
        [len(per_conv[c]) for c in conv_ids],
        [max(m.ts for m in per_conv[c]) for c in conv_ids],
    )
    last = {r["id"]: r["last_seq"] for r in rows}
    stored: list[Message] = []
    orphans: list[NewMessage] = []
    edited_ats: dict[int, int | None] = {}
    for conv in conv_ids:
        msgs = per_conv[conv]
        if conv not in last:
            orphans.extend(msgs)
            continue
        first = last[conv] - len(msgs) + 1
        for offset, m in enumerate(msgs):
            body, edited_at, deleted = overrides.get(m.id, (m.body, None, False))
            stored.append(
                Message(
                    m.conv,
                    m.id,
                    first + offset,
                    m.sender,
                    body,
                    m.ts,
                    m.cid,
                    m.kind,
                    m.ref,
                    m.reply_to,
                    edited_at is not None,
                    deleted,
                )
            )
            edited_ats[m.id] = edited_at
    if stored:
        await conn.copy_records_to_table(
            "messages",
            records=[
                (
                    m.conv,
                    m.seq,
                    m.id,
                    m.sender,
                    m.cid,
                    m.body,
                    m.kind,
                    m.ts,
                    m.ref,
                    m.reply_to,
                    edited_ats[m.id],
                    m.deleted,
                )
                for m in stored
            ],
            columns=list(_COPY_COLUMNS),
        )
        # Mentions and replies go to the inbox in this transaction: exactly once.
        kinds = {r["id"]: r["kind"] for r in rows}
        stored = await notifications.derive(conn, stored, kinds)
    return stored, already, orphans


_COPY_COLUMNS = (
    "conv_id",
    "seq",
    "id",
    "sender",
    "cid",
    "body",
    "kind",
    "ts",
    "ref",
    "reply_to",
    "edited_at",
    "deleted",
)
_COLUMNS = ", ".join(_COPY_COLUMNS)
_M_COLUMNS = ", ".join(f"m.{c}" for c in _COPY_COLUMNS)


def _row_to_message(r: Any) -> Message:
    return Message(
        conv=r["conv_id"],
        id=r["id"],
        seq=r["seq"],
        sender=r["sender"],
        body=r["body"],
        ts=r["ts"],
        cid=r["cid"],
        kind=r["kind"],
        ref=r["ref"],
        reply_to=r["reply_to"],
        edited=r["edited_at"] is not None,
        deleted=r["deleted"],
    )


async def after(pools: ShardPools, conv: int, since_seq: int, limit: int) -> list[Message]:
    """Messages with seq > since_seq, oldest first, at most `limit`."""
    async with pools.connection(pools.for_id(conv)) as conn:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM messages
                WHERE conv_id = $1 AND seq > $2 ORDER BY seq LIMIT $3""",
            conv,
            since_seq,
            limit,
        )
    return [_row_to_message(r) for r in rows]


async def between(pools: ShardPools, conv: int, after_seq: int, before_seq: int) -> list[Message]:
    """Messages with after_seq < seq < before_seq, oldest first."""
    async with pools.connection(pools.for_id(conv)) as conn:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM messages
                WHERE conv_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq""",
            conv,
            after_seq,
            before_seq,
        )
    return [_row_to_message(r) for r in rows]


async def before(pools: ShardPools, conv: int, before_seq: int | None, limit: int) -> list[Message]:
    """Newest first, seq < before_seq (keyset page), at most `limit`."""
    async with pools.connection(pools.for_id(conv)) as conn:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM messages
                WHERE conv_id = $1 AND ($2::bigint IS NULL OR seq < $2)
                ORDER BY seq DESC LIMIT $3""",
            conv,
            before_seq,
            limit,
        )
    return [_row_to_message(r) for r in rows]


async def stored_id(pools: ShardPools, conv: int, sender: str, cid: str) -> tuple[int, int] | None:
    """(id, ts) of the message stored under (conv, sender, cid), or None: one read through
    the unique key. What the send path answers a retry that Redis no longer remembers."""
    async with pools.connection(pools.for_id(conv)) as conn:
        return (await stored_ids_on(conn, [(conv, sender, cid)]))[0]


async def stored_ids(
    pools: ShardPools, physical: int, keys: Sequence[tuple[int, str, str]]
) -> list[tuple[int, int] | None]:
    """`stored_id` for several (conv, sender, cid) of one physical shard in one query, in
    the order asked."""
    async with pools.connection(physical) as conn:
        return await stored_ids_on(conn, keys)


async def stored_ids_on(
    conn: Any, keys: Sequence[tuple[int, str, str]]
) -> list[tuple[int, int] | None]:
    """`stored_ids` on `conn` (of the keys' shard): the send path's reads, those made while
    one was in flight together (gateway/lookups.py). A read only: safe to run again."""
    if len(keys) == 1:
        conv, sender, cid = keys[0]
        # An event the sequencer refused (storage/events.py) is settled too, unsequenced.
        row = await conn.fetchrow(
            """SELECT id, ts FROM messages WHERE conv_id = $1 AND sender = $2 AND cid = $3
               UNION ALL
               SELECT id, ts FROM refused_events WHERE conv_id = $1 AND sender = $2 AND cid = $3
               LIMIT 1""",
            conv,
            sender,
            cid,
        )
        return [None if row is None else (row["id"], row["ts"])]
    rows = await conn.fetch(
        _STORED_IDS, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
    )
    out: list[tuple[int, int] | None] = [None] * len(keys)
    for row in rows:
        out[row["i"] - 1] = (row["id"], row["ts"])
    return out


# The arrays are read through `(SELECT $n)` so that no plan sees their length: otherwise a
# custom plan (for 2 keys) always looks cheaper than the generic one (costed for 10), and
# PostgreSQL plans the statement anew on every call (~0.2 ms of its CPU, 4x the execution;
# bench/RESULTS.md, "PostgreSQL's share"). Each key is an index probe either way (LATERAL).
# The transactional path's copies stored earlier, in the form storage/onetrip.py explains
# ("Plans"): as a plain join, the generic plan asyncpg's prepared statement keeps, made
# while `messages` was small, was a seq scan of the whole table per batch.
_STORED_ROWS = f"""SELECT {_M_COLUMNS}
               FROM unnest((SELECT $1::bigint[]), (SELECT $2::text[]), (SELECT $3::text[]))
                    AS k(conv_id, sender, cid)
               CROSS JOIN LATERAL (
                   SELECT * FROM messages x
                   WHERE x.conv_id = k.conv_id AND x.sender = k.sender AND x.cid = k.cid
                   LIMIT 1) AS m"""

_STORED_IDS = """SELECT k.i, m.id, m.ts
               FROM unnest((SELECT $1::bigint[]), (SELECT $2::text[]), (SELECT $3::text[]))
                    WITH ORDINALITY AS k(conv, sender, cid, i)
               CROSS JOIN LATERAL (
                   SELECT id, ts FROM messages
                   WHERE conv_id = k.conv AND sender = k.sender AND cid = k.cid
                   UNION ALL
                   SELECT id, ts FROM refused_events
                   WHERE conv_id = k.conv AND sender = k.sender AND cid = k.cid
                   LIMIT 1) AS m"""


async def latest_seq(pools: ShardPools, conv: int) -> int:
    async with pools.connection(pools.for_id(conv)) as conn:
        seq: int | None = await conn.fetchval(
            "SELECT last_seq FROM conversations WHERE id = $1", conv
        )
    return seq or 0


async def latest_seqs(pools: ShardPools, convs: Iterable[int]) -> dict[int, int]:
    """The last seq of each of `convs` (unknown ones left out): one query per physical
    shard, shards in parallel. A shard that fails raises (the caller tries again)."""
    by_shard: dict[int, list[int]] = defaultdict(list)
    for conv in convs:
        by_shard[pools.for_id(conv)].append(conv)

    async def one(physical: int, group: list[int]) -> list[Any]:
        async with pools.connection(physical) as conn:
            rows: list[Any] = await conn.fetch(
                "SELECT id, last_seq FROM conversations WHERE id = ANY($1::bigint[])", group
            )
        return rows

    parts = await asyncio.gather(*(one(p, g) for p, g in by_shard.items()))
    return {r["id"]: r["last_seq"] for part in parts for r in part}


async def recover(
    pools: ShardPools, conv: int, since_seq: int, limit: int
) -> tuple[int, list[Message]]:
    """(the conversation's last seq, the messages after `since_seq`) in one round trip:
    what a `sub` needs, so a resubscribe storm costs one query per subscription. When more
    than `limit` are missing none is read (the caller cannot replay them anyway): the
    decision is made from `last_seq` in the same statement, so a client far behind costs
    one row, not `limit` rows thrown away."""
    async with pools.connection(pools.for_id(conv)) as conn:
        rows = await conn.fetch(
            f"""SELECT c.last_seq, {_M_COLUMNS}
               FROM conversations c
               LEFT JOIN LATERAL (
                   SELECT * FROM messages
                   WHERE conv_id = c.id AND seq > $2 AND c.last_seq - $2 <= $3
                   ORDER BY seq LIMIT $3
               ) m ON true
               WHERE c.id = $1""",
            conv,
            since_seq,
            limit,
        )
    if not rows:
        return 0, []
    latest: int = rows[0]["last_seq"]
    return latest, [_row_to_message(r) for r in rows if r["seq"] is not None]
