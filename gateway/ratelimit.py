"""Per-user limits across the cluster, with a local fast path.

The common case costs no round trip: a local token bucket answers at once. Every
`flush_s` the node adds what it allowed to a per-second counter in Redis (one pipelined
round trip for all active users) and reads back the cluster-wide totals; a user over the
limit across the cluster is refused locally until that second is over, and the local
bucket is emptied so the blocked spell banks nothing. So a user spread over N nodes gets
about N flush intervals' worth of excess per second, not N times the limit.

(Sends do not use this: the send path counts them exactly in the Redis round trip it
makes anyway; see gateway/send.py.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import redis.asyncio as aioredis

from gateway.limits import BucketMap
from storage.redis_keys import RedisKeys

log = logging.getLogger("agora.gateway")


class ClusterLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        scope: str,
        rate: int,
        flush_s: float = 0.2,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scope = scope
        self.rate = rate
        self.burst = 2 * rate
        self.flush_s = flush_s
        self._local = BucketMap(rate, self.burst)
        self._pending: Counter[str] = Counter()
        self._blocked: dict[str, float] = {}  # user -> wall time the block ends
        self.refused = 0

    def check(self, user: str) -> int:
        """0 when `user` may go on; else the ms to wait (a refusal)."""
        if self.rate <= 0:
            return 0
        now = time.time()
        until = self._blocked.get(user)
        if until is not None:
            if until > now:
                self.refused += 1
                return max(1, int((until - now) * 1000))
            del self._blocked[user]
        wait = self._local.take(user, time.monotonic())
        if wait:
            self.refused += 1
            return wait
        self._pending[user] += 1
        return 0

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, Counter()
        window = int(time.time())
        pipe = self.redis.pipeline(transaction=False)
        users = list(pending)
        for user in users:
            key = self.keys.rate(self.scope, user, window)
            pipe.incrby(key, pending[user])
            pipe.expire(key, 5)
        results = await pipe.execute()
        for i, user in enumerate(users):
            # The local bucket lets a burst through; across the cluster each second may
            # carry at most `rate`, so a user spread over N nodes keeps close to it.
            if int(results[2 * i]) > self.rate:
                self._blocked[user] = window + 1.0
                self._local.drain(user, time.monotonic())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except (aioredis.RedisError, OSError) as exc:
                # Redis down: the local buckets still bound every user per node.
                log.debug("rate limit flush failed: %s", exc)

    def start(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.run())
