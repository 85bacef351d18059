"""Who may read and write a conversation, with a short local cache.

Positive answers are cached for a few seconds and negative ones for one, so a busy sender
costs no query per message while a new member is let in quickly. A removed member may keep
sending for at most the positive TTL.
"""

from __future__ import annotations

import time

from storage import conversations
from storage.errors import Forbidden, NotFound
from storage.pools import ShardPools

POSITIVE_TTL_S = 5.0
NEGATIVE_TTL_S = 1.0
MAX_ENTRIES = 200_000


class Access:
    def __init__(self, pools: ShardPools) -> None:
        self.pools = pools
        self._cache: dict[tuple[str, int], tuple[float, str]] = {}
        self.queries = 0  # observed by tests: the cache must spare the database

    async def check(self, user: str, conv: int) -> str:
        """The conversation's kind if `user` may use it; Forbidden / NotFound otherwise.
        A post's thread is public to every authenticated user."""
        now = time.monotonic()
        hit = self._cache.get((user, conv))
        if hit is not None and hit[0] > now:
            kind = hit[1]
        else:
            self.queries += 1
            found = await conversations.access(self.pools, conv, user)
            if found is None:
                kind = ""
            else:
                kind = found[0] if (found[1] or found[0] == "thread") else "-"
            if len(self._cache) >= MAX_ENTRIES:
                self._cache.clear()
            ttl = POSITIVE_TTL_S if kind not in ("", "-") else NEGATIVE_TTL_S
            self._cache[(user, conv)] = (now + ttl, kind)
        if kind == "":
            raise NotFound("no such conversation")
        if kind == "-":
            raise Forbidden("not a member of this conversation")
        return kind

    def forget(self, user: str, conv: int) -> None:
        self._cache.pop((user, conv), None)
