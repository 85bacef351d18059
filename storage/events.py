"""Edits, deletes and reactions: applied where they are sequenced, in seq order.

An event is a message row of its own (kind edit | delete | react | unreact, `ref` naming
the target), so replay and ordering come from the message path. `apply` runs inside the
sequencing transaction of `storage.messages.append_batch`, after the conversation rows of
the batch are locked (every writer of a conversation's messages and reactions holds that
lock), and decides in batch order which events take effect:

- edit and delete: only by the target's sender, only on a text or comment that is not
  deleted. A delete empties the target's body and the bodies of its earlier edit events:
  the text is gone from storage, the tombstone row stays.
- react and unreact: one row per (message, user, emoji); an event that would change
  nothing (a second react of the same emoji) is refused, so every sequenced reaction
  event moves a count by exactly one and a client can count them.

Refused events get no seq and are remembered in `refused_events`, so a Kafka redelivery
of one is refused again instead of being applied to a later state. The gateway checks the
same rules first (gateway/events.py); this is the check that holds under races.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage.models import Message, NewMessage
from storage.pools import ShardPools

CONTENT_KINDS = ("text", "comment")
EVENT_KINDS = ("edit", "delete", "react", "unreact")


@dataclass
class _Target:
    conv: int
    sender: str
    kind: str
    deleted: bool
    in_batch: bool
    body: str | None = None  # a new body, when changed
    edited_at: int | None = None
    dirty: bool = False


@dataclass
class Outcome:
    """What `apply` decided: the messages to sequence (in order), and the new state of
    rows of this batch (by id: body, edited_at, deleted) to store with them."""

    keep: list[NewMessage] = field(default_factory=list)
    overrides: dict[int, tuple[str, int | None, bool]] = field(default_factory=dict)
    refused: int = 0


def refusal(target: _Target | None, ev: NewMessage) -> str | None:
    """Why `ev` cannot apply to `target` (None: it can). Pure."""
    if target is None or target.conv != ev.conv:
        return "no such message in this conversation"
    if target.kind not in CONTENT_KINDS:
        return "only a text or comment can be changed"
    if target.deleted:
        return "the message is deleted"
    if ev.kind in ("edit", "delete") and target.sender != ev.sender:
        return "only the sender edits or deletes a message"
    return None


async def apply(conn: Any, fresh: list[NewMessage]) -> Outcome:
    """Apply the events of `fresh` (see the module doc); `conn` is in the transaction."""
    events = [m for m in fresh if m.kind in EVENT_KINDS]
    out = Outcome()
    if not events:
        out.keep = fresh
        return out
    # Conversation rows first, in a fixed order, as append_batch's update takes them.
    await conn.execute(
        "SELECT id FROM conversations WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
        sorted({m.conv for m in fresh}),
    )
    refused_before = {
        (r["conv_id"], r["sender"], r["cid"])
        for r in await conn.fetch(
            """SELECT r.conv_id, r.sender, r.cid FROM refused_events r
               JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS k(conv_id, sender, cid)
                 ON r.conv_id = k.conv_id AND r.sender = k.sender AND r.cid = k.cid""",
            [m.conv for m in events],
            [m.sender for m in events],
            [m.cid for m in events],
        )
    }
    targets = await _load_targets(conn, events)
    reactions = await _load_reactions(conn, events)
    before = dict(reactions)
    edits_of: dict[int, list[int]] = {}  # target id -> this batch's kept edit events
    refused: list[NewMessage] = []
    deleted_now: list[int] = []
    for m in fresh:
        if m.kind not in EVENT_KINDS:
            targets[m.id] = _Target(m.conv, m.sender, m.kind, False, in_batch=True)
            out.keep.append(m)
            continue
        if (m.conv, m.sender, m.cid) in refused_before:
            continue
        assert m.ref is not None
        target = targets.get(m.ref)
        if refusal(target, m) is not None:
            refused.append(m)
            continue
        assert target is not None
        if m.kind == "edit":
            target.body, target.edited_at, target.dirty = m.body, m.ts, True
            edits_of.setdefault(m.ref, []).append(m.id)
        elif m.kind == "delete":
            target.body, target.deleted, target.dirty = "", True, True
            deleted_now.append(m.ref)
            for edit_id in edits_of.pop(m.ref, ()):
                out.overrides[edit_id] = ("", None, False)
        else:
            key = (m.ref, m.sender, m.body)
            want = m.kind == "react"
            if reactions.get(key, False) == want:
                refused.append(m)
                continue
            reactions[key] = want
        out.keep.append(m)
    for target_id, t in targets.items():
        if t.dirty and t.in_batch:
            out.overrides[target_id] = (t.body or "", t.edited_at, t.deleted)
    await _store(conn, targets, reactions, before, deleted_now, refused)
    out.refused = len(refused)
    return out


async def _load_targets(conn: Any, events: list[NewMessage]) -> dict[int, _Target]:
    rows = await conn.fetch(
        """SELECT m.id, m.conv_id, m.sender, m.kind, m.deleted FROM messages m
           JOIN unnest($1::bigint[], $2::bigint[]) AS k(conv_id, id)
             ON m.conv_id = k.conv_id AND m.id = k.id""",
        [m.conv for m in events],
        [m.ref for m in events],
    )
    return {
        r["id"]: _Target(r["conv_id"], r["sender"], r["kind"], r["deleted"], in_batch=False)
        for r in rows
    }


async def _load_reactions(conn: Any, events: list[NewMessage]) -> dict[tuple[int, str, str], bool]:
    keys = [
        (m.ref, m.sender, m.body)
        for m in events
        if m.kind in ("react", "unreact") and m.ref is not None
    ]
    if not keys:
        return {}
    rows = await conn.fetch(
        """SELECT r.message_id, r.user_id, r.emoji FROM reactions r
           JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS k(message_id, user_id, emoji)
             ON r.message_id = k.message_id AND r.user_id = k.user_id AND r.emoji = k.emoji""",
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )
    found = {(r["message_id"], r["user_id"], r["emoji"]) for r in rows}
    return {k: k in found for k in keys}


async def _store(
    conn: Any,
    targets: dict[int, _Target],
    reactions: dict[tuple[int, str, str], bool],
    before: dict[tuple[int, str, str], bool],
    deleted_now: list[int],
    refused: list[NewMessage],
) -> None:
    stored = [(i, t) for i, t in targets.items() if t.dirty and not t.in_batch]
    if stored:
        await conn.execute(
            """UPDATE messages m
               SET body = COALESCE(v.body, m.body),
                   edited_at = COALESCE(v.edited_at, m.edited_at),
                   deleted = v.deleted
               FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bool[])
                 AS v(conv_id, id, body, edited_at, deleted)
               WHERE m.conv_id = v.conv_id AND m.id = v.id""",
            [t.conv for _, t in stored],
            [i for i, _ in stored],
            [t.body for _, t in stored],
            [t.edited_at for _, t in stored],
            [t.deleted for _, t in stored],
        )
    if deleted_now:
        convs = [targets[i].conv for i in deleted_now]
        # The text is gone from storage: the earlier edits' bodies too.
        await conn.execute(
            """UPDATE messages m SET body = ''
               FROM unnest($1::bigint[], $2::bigint[]) AS v(conv_id, ref)
               WHERE m.conv_id = v.conv_id AND m.ref = v.ref AND m.kind = 'edit'""",
            convs,
            deleted_now,
        )
    changed = [k for k, v in reactions.items() if before.get(k, False) != v]
    added = [k for k in changed if reactions[k]]
    removed = [k for k in changed if not reactions[k]]
    if added:
        await conn.execute(
            """INSERT INTO reactions (message_id, user_id, emoji, conv_id)
               SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[])""",
            [k[0] for k in added],
            [k[1] for k in added],
            [k[2] for k in added],
            [targets[k[0]].conv for k in added],
        )
    if removed:
        await conn.execute(
            """DELETE FROM reactions r
               USING unnest($1::bigint[], $2::text[], $3::text[]) AS k(message_id, user_id, emoji)
               WHERE r.message_id = k.message_id AND r.user_id = k.user_id
                 AND r.emoji = k.emoji""",
            [k[0] for k in removed],
            [k[1] for k in removed],
            [k[2] for k in removed],
        )
    if deleted_now:
        await conn.execute(
            "DELETE FROM reactions WHERE message_id = ANY($1::bigint[])", deleted_now
        )
    if refused:
        await conn.execute(
            """INSERT INTO refused_events (conv_id, sender, cid, id, ts)
               SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[],
                                    $5::bigint[])
               ON CONFLICT DO NOTHING""",
            [m.conv for m in refused],
            [m.sender for m in refused],
            [m.cid for m in refused],
            [m.id for m in refused],
            [m.ts for m in refused],
        )


async def reaction_counts(
    conn: Any, message_ids: list[int], user: str
) -> dict[int, tuple[dict[str, int], list[str]]]:
    """Per message: ({emoji: count}, the emojis `user` reacted with)."""
    if not message_ids:
        return {}
    rows = await conn.fetch(
        """SELECT message_id, emoji, count(*) AS n, bool_or(user_id = $2) AS mine
           FROM reactions WHERE message_id = ANY($1::bigint[])
           GROUP BY message_id, emoji ORDER BY message_id, n DESC, emoji""",
        message_ids,
        user,
    )
    out: dict[int, tuple[dict[str, int], list[str]]] = {}
    for r in rows:
        counts, mine = out.setdefault(r["message_id"], ({}, []))
        counts[r["emoji"]] = r["n"]
        if r["mine"]:
            mine.append(r["emoji"])
    return out


@dataclass(frozen=True, slots=True)
class Page:
    """A page of history in its current state, read in one snapshot: `last_seq` is the
    conversation's seq at that snapshot, and every edit, delete and reaction up to it (and
    none after) is reflected, so a client subscribing with `since = last_seq` counts
    nothing twice."""

    last_seq: int
    messages: list[Message]
    reactions: dict[int, tuple[dict[str, int], list[str]]]


async def current_page(
    pools: ShardPools, conv: int, before_seq: int | None, limit: int, user: str
) -> Page:
    """Texts and comments (events left out) newest first, seq < before_seq, at most
    `limit`, with their reactions counted (and `user`'s own)."""
    from storage.messages import _COLUMNS, _row_to_message  # one row shape for every read

    async with (
        pools.connection(pools.for_id(conv)) as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        last_seq = await conn.fetchval("SELECT last_seq FROM conversations WHERE id = $1", conv)
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM messages
                    WHERE conv_id = $1 AND ($2::bigint IS NULL OR seq < $2)
                      AND kind IN ('text', 'comment')
                    ORDER BY seq DESC LIMIT $3""",
            conv,
            before_seq,
            limit,
        )
        msgs = [_row_to_message(r) for r in rows]
        counts = await reaction_counts(conn, [m.id for m in msgs if not m.deleted], user)
    return Page(last_seq or 0, msgs, counts)


async def target(pools: ShardPools, conv: int, message_id: int) -> Message | None:
    """The message `message_id` of `conv` as stored now (None: not stored, or elsewhere)."""
    from storage.messages import _COLUMNS, _row_to_message

    async with pools.connection(pools.for_id(conv)) as conn:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM messages WHERE conv_id = $1 AND id = $2", conv, message_id
        )
    return None if row is None else _row_to_message(row)
