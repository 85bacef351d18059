"""Read state at the gateway: move a member's read pointer, then tell who should know.

The pointer is stored first (storage/readstate.py); then, only when it moved, the user's
connections on every node get `read {conv, seq}` (a second device clears its badge) and,
in direct conversations and groups of at most AGORA_RECEIPTS_MAX_MEMBERS members, the
other members' connections get `receipt {conv, user, seq}`. Those frames are best effort
(a pointer is never lost with them): a client that missed one reads the state over HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

from core.errors import Forbidden
from gateway.access import Access
from gateway.node import Node
from gateway.protocol import frames
from storage import readstate

log = logging.getLogger("agora.gateway")
RECEIPT_KINDS = ("direct", "group")


class ReadPath:
    def __init__(self, node: Node, access: Access) -> None:
        self.node = node
        self.access = access
        self.pools = access.pools
        self.receipts_max = node.settings.receipts_max_members

    def receipts_for(self, kind: str, members: int) -> bool:
        return kind in RECEIPT_KINDS and 0 < members <= self.receipts_max

    async def read(self, user: str, conv: int, seq: int) -> int:
        """Move `user`'s pointer in `conv` to `seq` (if further); the pointer now. In a
        post's thread (public, no membership) nothing is kept: 0."""
        await self.access.check(user, conv)
        marked = await readstate.mark(self.pools, conv, user, seq)
        if marked is None:
            return 0
        if marked.moved:
            out: dict[str, dict[str, Any]] = {}
            if self.receipts_for(marked.kind, marked.members):
                receipt = frames.receipt(conv, user, marked.seq)
                for member, _ in await readstate.pointers(self.pools, conv):
                    out[member] = receipt
            out[user] = frames.read(conv, marked.seq)
            try:
                await self.node.publish_to_users(out)
            except (OSError, aioredis.RedisError) as exc:
                log.warning("read of %s in %d stored, not announced: %s", user, conv, exc)
        return marked.seq

    async def receipts(self, user: str, conv: int) -> list[tuple[str, int]]:
        """Every member's pointer, to a member of a conversation that keeps receipts."""
        kind = await self.access.check(user, conv)
        found = await readstate.pointers(self.pools, conv)
        if not self.receipts_for(kind, len(found)):
            raise Forbidden(
                "read receipts are kept for direct conversations and groups of at most "
                f"{self.receipts_max} members"
            )
        return found
