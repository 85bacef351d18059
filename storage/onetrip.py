"""The common shard batch in one round trip: plain texts sequenced by one SQL statement.

`storage.messages.append_batch` sequences a batch in an explicit transaction of about six
round trips (BEGIN, the dedup SELECT, UPDATE conversations, COPY in two, COMMIT). At 100
msgs/s most worker batches hold one or two records, so that per-batch cost is most of
the durable path's (bench/RESULTS.md, issue 14). For a batch that needs nothing else in
its transaction, `append` does the same work in one statement sent without BEGIN/COMMIT:
a single statement is its own transaction (committed with synchronous_commit as every
other), so it stores all of its messages or none, and the caller gets exactly the
(stored, already, orphans) `append_batch` would have returned.

What the batch must be (`fits`): texts and comments only (no edit, delete or reaction:
`storage.events.apply` reads and writes other rows in the transaction), none with `@` in
its body or a `reply_to` (`storage.notifications.derive` writes their inbox entries in the
transaction). What `derive` and `mark_direct` still need, the members of the batch's direct
conversations (only ever read: a direct conversation's two members are inserted with it
and never change), comes back from the same statement.

Everything else is unchanged: the same unique key makes a concurrent store of the same
(conv, sender, cid) fail the whole statement with 23505 (`Fault.RACE`, retried by the
sequencer; nothing was stored, no seq used); any other error is the same SQLSTATE the
transactional path would meet, classified by `storage.pgerrors` as before.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from storage.events import CONTENT_KINDS
from storage.messages import _M_COLUMNS, _row_to_message, first_of_each
from storage.models import Message, NewMessage
from storage.notifications import with_dm_to

# All CTEs of one statement see one snapshot, taken when it starts; the row locks are what
# orders it against concurrent batches, as in the transactional path.
#
# Lock order: the conversation rows are locked by `locked`, ascending by id: its Sort runs
# below its LockRows, so rows are locked in the order they are emitted. `bumped` updates
# only rows that `locked` has emitted (the IN on it), so by the time the UPDATE touches a
# row, that row and every lower id of the batch is already ours: two batches always take
# their common rows in the same order and cannot deadlock. A plain UPDATE ... FROM would
# lock rows in its join's output order, which the planner chooses (a hash join over a
# seq scan locks in heap order).
#
# Seqs: each conversation's `n` fresh messages take last_seq + 1 .. last_seq + n, in batch
# order (`pos`, from the array's ordinality). `bumped` sees the newest row version (READ
# COMMITTED re-reads a row updated by a batch that committed while we waited for its lock).
#
# Plans: asyncpg prepares the statement, and after five executions PostgreSQL keeps one
# generic plan for the connection's life (until an ANALYZE invalidates it), made with the
# statistics of that moment. Two things keep that plan cheap whatever they said:
# - the arrays are read through `(SELECT $n)`, so no plan sees their length: a custom plan
#   would be no cheaper than the generic one, which is then kept (otherwise the statement
#   is planned anew per batch, ~0.4 ms of PostgreSQL CPU, once `old` is a LATERAL);
# - `old` probes the unique index per message (a LATERAL with LIMIT 1 is not flattened
#   into a join): as a plain join, a generic plan made while `messages` was small (a new
#   shard) hash-joined a seq scan of the whole table per batch, growing with it
#   (bench/RESULTS.md, "PostgreSQL's share": 2 ms a batch after 5,000 messages).
_APPEND = f"""
WITH k AS (
    SELECT * FROM unnest((SELECT $1::bigint[]), (SELECT $2::bigint[]), (SELECT $3::text[]),
                         (SELECT $4::text[]), (SELECT $5::text[]), (SELECT $6::bigint[]),
                         (SELECT $7::text[]), (SELECT $8::bigint[]))
        WITH ORDINALITY AS k(conv_id, id, sender, cid, body, ts, kind, ref, i)
),
old AS (
    SELECT k.i, {_M_COLUMNS} FROM k
    CROSS JOIN LATERAL (
        SELECT * FROM messages x
        WHERE x.conv_id = k.conv_id AND x.sender = k.sender AND x.cid = k.cid
        LIMIT 1
    ) m
),
fresh AS (
    SELECT k.*,
           row_number() OVER (PARTITION BY k.conv_id ORDER BY k.i) AS pos,
           count(*) OVER (PARTITION BY k.conv_id) AS n
    FROM k WHERE k.i NOT IN (SELECT i FROM old)
),
per_conv AS (
    SELECT conv_id, count(*) AS n, max(ts) AS last_ts FROM fresh GROUP BY conv_id
),
locked AS MATERIALIZED (
    SELECT c.id FROM conversations c
    WHERE c.id IN (SELECT conv_id FROM per_conv)
    ORDER BY c.id
    FOR UPDATE
),
bumped AS (
    UPDATE conversations c
       SET last_seq = c.last_seq + p.n,
           last_message_at = to_timestamp(p.last_ts / 1000.0)
      FROM per_conv p
     WHERE c.id = p.conv_id AND c.id IN (SELECT id FROM locked)
    RETURNING c.id, c.last_seq, c.kind
),
inserted AS (
    INSERT INTO messages (conv_id, seq, id, sender, cid, body, kind, ts, ref)
    SELECT f.conv_id, b.last_seq - f.n + f.pos, f.id, f.sender, f.cid, f.body, f.kind,
           f.ts, f.ref
    FROM fresh f JOIN bumped b ON b.id = f.conv_id
    ORDER BY f.conv_id, f.pos
),
direct AS (
    SELECT m.conv_id, m.user_id FROM members m
    JOIN conversations c ON c.id = m.conv_id
    WHERE c.kind = 'direct' AND c.id IN (SELECT conv_id FROM k)
)
SELECT 'old' AS what, o.i, o.conv_id, o.seq, o.id, o.sender, o.cid, o.body, o.kind, o.ts,
       o.ref, o.reply_to, o.edited_at, o.deleted, NULL::text AS conv_kind,
       NULL::text AS member
FROM old o
UNION ALL
SELECT 'new', f.i, f.conv_id, b.last_seq - f.n + f.pos, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, b.kind, NULL
FROM fresh f LEFT JOIN bumped b ON b.id = f.conv_id
UNION ALL
SELECT 'dm', NULL, d.conv_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, d.user_id
FROM direct d
"""


def fits(batch: list[NewMessage]) -> bool:
    """Whether `append` may sequence `batch`: nothing in it needs another write in the
    sequencing transaction (see the module doc). Pure."""
    return all(m.kind in CONTENT_KINDS and m.reply_to is None and "@" not in m.body for m in batch)


async def append(
    conn: Any, batch: list[NewMessage]
) -> tuple[list[Message], list[Message], list[NewMessage]]:
    """`append_batch` for a batch that `fits`, in one statement on `conn`, which must NOT be
    in a transaction (the statement is its own). Same result, same order: stored per
    conversation by id then batch order, already stored in batch order, orphans (no such
    conversation on this shard) like stored."""
    assert fits(batch), "a batch that needs the transactional path"
    items = first_of_each(batch)
    if not items:
        return [], [], []
    rows = await conn.fetch(
        _APPEND,
        [m.conv for m in items],
        [m.id for m in items],
        [m.sender for m in items],
        [m.cid for m in items],
        [m.body for m in items],
        [m.ts for m in items],
        [m.kind for m in items],
        [m.ref for m in items],
    )
    old: dict[int, Message] = {}
    seqs: dict[int, int | None] = {}  # position -> seq (None: an orphan)
    direct: dict[int, set[str]] = defaultdict(set)  # direct conversation -> its members
    for r in rows:
        if r["what"] == "old":
            old[r["i"]] = _row_to_message(r)
        elif r["what"] == "new":
            seqs[r["i"]] = r["seq"]
        else:
            direct[r["conv_id"]].add(r["member"])
    # A redelivered direct message gets its recipient again, as `mark_direct` gives it.
    already = with_dm_to([old[i] for i in sorted(old)], direct)
    per_conv: dict[int, list[tuple[int, NewMessage]]] = defaultdict(list)
    for i, m in enumerate(items, start=1):
        if i not in old:
            per_conv[m.conv].append((i, m))
    stored: list[Message] = []
    orphans: list[NewMessage] = []
    for conv in sorted(per_conv):
        for i, m in per_conv[conv]:
            seq = seqs[i]
            if seq is None:
                orphans.append(m)
                continue
            stored.append(Message(m.conv, m.id, seq, m.sender, m.body, m.ts, m.cid, m.kind, m.ref))
    # `derive` of such a batch writes nothing; it only sets `dm_to` on direct messages.
    return with_dm_to(stored, direct), already, orphans
