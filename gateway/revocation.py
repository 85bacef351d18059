"""Membership changes, cluster-wide: every node learns at once that a user lost (or got)
a conversation, drops its cached answer and ends that user's local subscriptions.

The writer (the HTTP handler that removed a member or deleted a post) commits in
PostgreSQL first, then appends `(conv, user, reason)` to one Redis stream. Every node
reads the stream with a blocking XREAD from the last entry it has read. A stream rather
than pub/sub because a reader does not lose entries while its connection is down: it
goes on from its last id, so a node that reconnects applies what it missed.

What a node can still miss: entries it had not read that vanished (Redis restarted or
flushed, or so many entries that trimming passed it). Each entry names the id of the
entry before it (appended by one script, so the chain has no holes), and a reader
compares that with the last id it read: a mismatch means entries went missing. A stream
that vanished with nothing new written is found by checking, whenever the stream is quiet
or after an error, that the last entry read still exists. Either way the node forgets
every cached answer and re-checks every local subscription against the shards, one
query per conversation. While Redis is unreachable nothing that the
cache guards can succeed anyway: a send, a `sub` and `typing` each need Redis.

The send path pays nothing for this: a cache hit is still a dict lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from gateway.access import Access
from gateway.node import Node
from storage import conversations
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys

log = logging.getLogger("agora.gateway")

REMOVED = "removed"  # another member (the creator) removed the user
LEFT = "left"  # the user left
CLOSED = "closed"  # the conversation closed (a post deleted): everyone is out
ADDED = "added"  # a new member: only cached refusals are dropped
REASONS = (REMOVED, LEFT, CLOSED, ADDED)
STREAM_MAXLEN = 10_000  # approximate; a reader this far behind re-checks everything
BLOCK_MS = 2000  # a quiet stream is checked this often; under AGORA_REDIS_TIMEOUT_S (3+ s)
READ_COUNT = 500
RECHECK_PARALLEL = 8


# KEYS: the stream. ARGV: conv, user, reason, maxlen. Appends the entry with `p` = the id
# of the entry before it ("0-0" for the first of a stream), and returns the new id.
_APPEND = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if newest[1] then prev = newest[1][1] end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*',
                  'c', ARGV[1], 'u', ARGV[2], 'r', ARGV[3], 'p', prev)
"""


async def _append(redis: aioredis.Redis, key: str, conv: int, user: str, reason: str) -> str:
    new_id = await redis.eval(_APPEND, 1, key, str(conv), user, reason, str(STREAM_MAXLEN))
    return _text(new_id)


async def announce(
    redis: aioredis.Redis, keys: RedisKeys, conv: int, user: str | None, reason: str
) -> None:
    """Tell every node (after the change is committed in the shards). `user` None: the
    whole conversation (closed)."""
    assert reason in REASONS
    await _append(redis, keys.revocations(), conv, user or "", reason)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RevocationWatcher:
    def __init__(
        self, redis: aioredis.Redis, keys: RedisKeys, access: Access, node: Node, pools: ShardPools
    ) -> None:
        self.redis = redis
        self.key = keys.revocations()
        self.access = access
        self.node = node
        self.pools = pools
        self.last = "0-0"
        self.applied = 0  # entries applied (observed by tests)
        self.rechecks = 0  # full re-checks after lost entries

    async def start(self) -> asyncio.Task[None]:
        """Anchor at the stream's end (before anything is cached), then read on."""
        self.last = await self._anchor()
        return asyncio.create_task(self._run())

    async def _anchor(self) -> str:
        newest = await self.redis.xrevrange(self.key, count=1)
        if newest:
            return _text(newest[0][0])
        return await _append(self.redis, self.key, 0, "", ADDED)

    async def _run(self) -> None:
        suspect = False  # an error happened: entries may have vanished meanwhile
        while True:
            try:
                if suspect:
                    await self._verify()
                    suspect = False
                reply: Any = await self.redis.xread({self.key: self.last}, READ_COUNT, BLOCK_MS)
                if not reply:
                    await self._verify()
                    continue
                broken = False
                for _stream, entries in reply:
                    for entry_id, fields in entries:
                        if not self._apply(fields):
                            broken = True
                        self.last = _text(entry_id)
                if broken:
                    log.warning("revocation stream has a hole; re-checking every subscription")
                    await self.recheck()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("revocation stream: %s; reading again", exc)
                suspect = True
                await asyncio.sleep(0.5)

    async def _verify(self) -> None:
        if await self.redis.xrange(self.key, self.last, self.last, count=1):
            return
        log.warning("revocation stream lost entries; re-checking every subscription")
        self.last = await self._anchor()
        await self.recheck()

    def _apply(self, fields: dict[Any, Any]) -> bool:
        """Apply one entry; False when the entry before it is not the last one we read."""
        data = {_text(k): _text(v) for k, v in fields.items()}
        follows = data.get("p") == self.last
        try:
            conv = int(data["c"])
            user = data["u"] or None
            reason = data["r"]
        except (KeyError, ValueError):
            log.error("revocation stream: bad entry %r dropped", data)
            return follows
        if not conv:
            return follows  # an anchor
        self.applied += 1
        self.access.revoke(conv, user)
        if reason != ADDED:
            self.node.unsubscribe_user(conv, user, reason)
        return follows

    async def recheck(self) -> None:
        """Forget every cached answer; end each local subscription that no longer holds."""
        self.rechecks += 1
        self.access.clear()
        gate = asyncio.Semaphore(RECHECK_PARALLEL)

        async def one(conv: int) -> None:
            users = {c.user for c in self.node.conv_subs.get(conv, ())}
            if not users:
                return
            async with gate:
                allowed = await conversations.allowed_among(self.pools, conv, users)
            for user in users - allowed:
                self.node.unsubscribe_user(conv, user, REMOVED)

        results = await asyncio.gather(
            *(one(conv) for conv in list(self.node.conv_subs)), return_exceptions=True
        )
        failed = sum(1 for r in results if isinstance(r, BaseException))
        if failed:
            log.warning("re-check: %d conversations could not be checked", failed)


async def announce_quietly(
    redis: aioredis.Redis, keys: RedisKeys, conv: int, user: str | None, reason: str
) -> bool:
    """`announce`, False instead of an error (the caller decides what a failure means)."""
    with contextlib.suppress(aioredis.RedisError, OSError):
        await announce(redis, keys, conv, user, reason)
        return True
    return False
