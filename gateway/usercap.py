"""At most `AGORA_MAX_CONNECTIONS_PER_USER` WebSocket sessions per user, cluster-wide.

Each node counts its own sessions of a user in one Redis hash per user (field: the node's
id and this process's incarnation, value: how many). A new session adds itself and reads
the hash in one round trip (shared by the connects that arrive together, as
gateway/coalesce.py shares reads), and is refused (4008) when the sum over live nodes
passes the cap. A node that died leaves its field behind: fields of nodes whose lease is gone are
not counted, and are removed. A process that restarts under the same node id has a new
incarnation, so it never inherits the old counts.

Decrements are batched (gateway/batches.py): a mass disconnect sends one pipelined
HINCRBY per user that left (their sessions added up), a few pipelines in all, and a batch
that fails is retried with backoff instead of dropped. While decrements wait (Redis slow or
away), `admit` counts them as done already, so a user is not refused for sessions that have
ended. What can still be wrong: decrements pending when the process ends are lost, but the
field is this incarnation's and stops counting when its lease goes; a batch whose reply was
lost after Redis applied it (a timeout) is applied twice when retried, an under-count that
lets the user hold that many sessions more until this process ends (preferred to an
over-count, which refuses a user's real connections for up to a day: the hash's TTL).
"""

from __future__ import annotations

import operator
import secrets
from typing import Any

import redis.asyncio as aioredis

from fanout.routing import Routes
from gateway.batches import Batcher
from gateway.coalesce import Coalescer
from storage.redis_keys import RedisKeys

KEY_TTL_S = 24 * 3600


class UserConnectionCap:
    def __init__(
        self, redis: aioredis.Redis, keys: RedisKeys, routes: Routes, node: str, cap: int
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.routes = routes
        self.node = node
        self.field = f"{node}|{secrets.token_hex(4)}"
        self.cap = cap
        self.refused = 0
        self.releases: Batcher[str, int] = Batcher(
            "session count decrements", self._decrement, operator.add
        )
        # Connects that arrive while a count is in flight are counted together, in the
        # next pipeline (a storm: a few round trips, not one per connect). One "shard": 0.
        self._counting: Coalescer[str, dict[Any, Any]] = Coalescer(self._count_many)

    async def admit(self, user: str) -> bool:
        """Count a new session of `user`; False (and not counted) when over the cap."""
        if self.cap <= 0:
            return True
        counts = await self._counting.read(0, user)
        total, dead = await self._live_total(counts)
        total -= self.releases.pending.get(user) or 0  # ended, decrement not sent yet
        if dead:
            await self.redis.hdel(self.keys.user_sessions(user), *dead)
        if total > self.cap:
            self.refused += 1
            self.releases.add(user, 1)  # not counted after all: with the next decrements
            return False
        return True

    async def _count_many(self, _: int, users: list[str]) -> list[dict[Any, Any]]:
        """Count a session of each of `users` (a user twice: two sessions), and answer the
        user's hash after each: one pipeline for the connects that arrived together."""
        pipe = self.redis.pipeline(transaction=False)
        for user in users:
            key = self.keys.user_sessions(user)
            pipe.hincrby(key, self.field, 1)
            pipe.expire(key, KEY_TTL_S)
            pipe.hgetall(key)
        replies = await pipe.execute()
        return [replies[i * 3 + 2] for i in range(len(users))]

    async def _live_total(self, counts: dict[Any, Any]) -> tuple[int, list[str]]:
        by_field = {_text(f): int(v) for f, v in counts.items()}
        nodes = {f.rpartition("|")[0] for f in by_field}
        live = await self.routes.live_nodes(nodes - {self.node}) | {self.node}
        total = sum(n for f, n in by_field.items() if f.rpartition("|")[0] in live)
        dead = [f for f in by_field if f.rpartition("|")[0] not in live]
        return total, dead

    def release(self, user: str) -> None:
        """A counted session ended (from a close callback: the decrement goes out with
        the next batch)."""
        if self.cap <= 0:
            return
        self.releases.add(user, 1)

    async def _decrement(self, batch: dict[str, int]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for user, ended in batch.items():
            pipe.hincrby(self.keys.user_sessions(user), self.field, -ended)
        await pipe.execute()

    async def stop(self) -> None:
        await self.releases.stop()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
