"""After a batch is stored and published: `notify` frames to the users it mentions or
replies to (storage/notifications.py wrote their inbox entries in the batch's
transaction), and inbox entries for direct messages whose recipient has no connection.

Best effort on the frames (the inbox is the truth); the direct-message entries are
idempotent, so a batch handled again writes nothing twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from fanout.envelope import Delivery
from fanout.routing import Routes
from storage.models import Message
from storage.notifications import Notification, add_dms, dm_of, excerpt
from storage.pools import ShardPools


def notification_json(n: Notification) -> dict[str, Any]:
    """A notification as the wire (the `notify` frame, `GET /v1/notifications`) shows it."""
    return {
        "id": str(n.message),
        "kind": n.kind,
        "conv": str(n.conv),
        "message": str(n.message),
        "from": n.sender,
        "excerpt": n.excerpt,
        "ts": n.ts,
        "read": n.read,
    }


def _frames(messages: list[Message]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for m in messages:
        for user, kind in m.notify:
            n = Notification(user, m.id, m.conv, kind, m.sender, excerpt(m.body), m.ts)
            out.append((user, {"t": "notify", "n": notification_json(n)}))
    return out


async def notify(
    routes: Routes,
    pools: ShardPools,
    messages: list[Message],
    redelivered: Sequence[Message] = (),
) -> None:
    """Live `notify` frames for what was stored now; inbox entries for the direct messages
    of offline recipients, also of `redelivered` ones: their first attempt may have failed
    or died after the commit, before writing the entry (a second write is a no-op)."""
    frames = _frames(messages)
    dms = [n for n in (dm_of(m) for m in [*messages, *redelivered]) if n is not None]
    users = {u for u, _ in frames} | {n.user for n in dms}
    if not users:
        return
    try:
        _, nodes = await routes.nodes_for(users=users)
    except (OSError, aioredis.RedisError):
        # Who is online is unknown: keep every direct message, then fail (the batch is
        # handled again; the frames are lost, the inbox is not).
        await add_dms(pools, dms)
        raise
    offline = [n for n in dms if not nodes.get(n.user)]
    if offline:
        await add_dms(pools, offline)
    deliveries: dict[str, Delivery] = {}
    for user, frame in frames:
        for node in nodes.get(user, ()):
            deliveries.setdefault(node, Delivery()).user_frames.append((user, frame))
    await routes.publish(deliveries)
