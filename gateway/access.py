"""Who may read and write a conversation, with a local cache that revocations clear.

Answers are cached so a busy sender costs no query per message. A membership that ends
(a member removed or leaving, a post's thread closed) is announced on the revocation
stream (`gateway.revocation`), and every node drops the matching entries as it reads
it, so a removed member's next send is refused on every node, not after a TTL.

A query that was in flight while a revocation arrived may have read the old state:
its answer is used once but not cached (`generation`). The positive TTL is no longer
what makes a removal take effect; it stays short as a backstop (a revocation a node
could not read, see gateway.revocation, still counts for sends within it) and so that
a conversation whose shard went down answers `unavailable` soon, as before. Negative
answers live one second, so a member just added (whose addition is also announced) is
let in quickly even where the announcement is late.
"""

from __future__ import annotations

import time
from collections import defaultdict

from core.errors import NotFound
from storage import conversations
from storage.pools import ShardPools

POSITIVE_TTL_S = 5.0
NEGATIVE_TTL_S = 1.0
MAX_ENTRIES = 200_000
# Same answer for "no such conversation" and "not a member": a non-member cannot learn
# which conversation ids exist.
NOT_FOUND = "no such conversation"


class Access:
    def __init__(self, pools: ShardPools) -> None:
        self.pools = pools
        self._cache: dict[tuple[str, int], tuple[float, str]] = {}
        self._by_conv: dict[int, set[str]] = defaultdict(set)
        self.generation = 0  # bumped by every revocation this node reads
        self.queries = 0  # observed by tests: the cache must spare the database

    async def check(self, user: str, conv: int, *, fresh: bool = False) -> str:
        """The conversation's kind if `user` may use it; NotFound otherwise (also for a
        non-member of a conversation that exists). A post's thread is public to every
        authenticated user while it is open. `fresh` skips the cache."""
        now = time.monotonic()
        hit = None if fresh else self._cache.get((user, conv))
        if hit is not None and hit[0] > now:
            kind = hit[1]
        else:
            self.queries += 1
            generation = self.generation
            found = await conversations.access(self.pools, conv, user)
            if found is None:
                kind = ""
            else:
                kind = found[0] if (found[1] or found[0] == "thread") else ""
            if generation == self.generation:  # no revocation raced with the query
                self._store(user, conv, kind, now)
        if not kind:
            raise NotFound(NOT_FOUND)
        return kind

    def _store(self, user: str, conv: int, kind: str, now: float) -> None:
        if len(self._cache) >= MAX_ENTRIES:
            self.clear()
        ttl = POSITIVE_TTL_S if kind else NEGATIVE_TTL_S
        self._cache[(user, conv)] = (now + ttl, kind)
        self._by_conv[conv].add(user)

    def forget(self, user: str, conv: int) -> None:
        self._cache.pop((user, conv), None)

    def revoke(self, conv: int, user: str | None) -> None:
        """Drop what is cached about `user` in `conv` (every user when None)."""
        self.generation += 1
        users = self._by_conv.get(conv)
        if users is None:
            return
        if user is None:
            for u in users:
                self._cache.pop((u, conv), None)
            del self._by_conv[conv]
        else:
            self._cache.pop((user, conv), None)
            users.discard(user)
            if not users:
                del self._by_conv[conv]

    def clear(self) -> None:
        """Forget everything (the node may have missed revocations)."""
        self.generation += 1
        self._cache.clear()
        self._by_conv.clear()
