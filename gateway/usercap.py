"""At most `AGORA_MAX_CONNECTIONS_PER_USER` WebSocket sessions per user, cluster-wide.

Each node counts its own sessions of a user in one Redis hash per user (field: the node's
id and this process's incarnation, value: how many). A new session adds itself and reads
the hash in one round trip (shared by the connects that arrive together, as
gateway/coalesce.py shares reads), and is refused (4008) when the sum over live nodes
passes the cap. A node that died leaves its field behind: fields of nodes whose lease is gone are
not counted, and are removed. A process that restarts under the same node id has a new
incarnation, so it never inherits the old counts.

Decrements are batched (gateway/batches.py): a mass disconnect sends one script call for
the users that left (their sessions added up; on a Redis Cluster one call per user, as the
keys of one script must share a slot), a few round trips in all, and a batch that fails is
retried with backoff instead of dropped. While decrements wait (Redis slow or away), `admit`
counts them as done already, so a user is not refused for sessions that have ended.

The count never goes below 0 and no key is left without a TTL: the decrement script
(`_RELEASE`) only lowers a field that exists, deletes it when it reaches 0 (Redis drops the
hash with its last field), and gives the hash back its TTL if it has none. A plain HINCRBY
-n made a negative field, in a new hash without a TTL, whenever the field was gone: Redis
restarted empty, or another node dropped this field as dead after this node's lease had
lapsed. A negative field let the user past the cap for as long as this process ran and the
key never went away. Fields below 0 left by older versions count as 0 (`_live_total`).

What can still be wrong, all of it an under-count (preferred to an over-count, which
refuses a user's real connections for up to a day: the hash's TTL):
- the field lost (the cases above) while the user still has sessions here: those are not
  counted again, so the user may open that many more until they end;
- a batch whose reply was lost after Redis applied it (a timeout) is applied twice when
  retried: the user's count is too low by the lost batch's amount (floored at 0) until
  their sessions here end. Not made idempotent: that needs a sequence per field, or
  writing the node's absolute count, which races the increments of `admit` (they go out
  on another connection) and errs toward an over-count;
- decrements pending when the process ends are lost, but the field is this incarnation's
  and stops counting when its lease goes.

A command error in a count pipeline (a user's key of the wrong type) fails that user's
connect alone: the other users' increments ran and are kept, with their releases. A count
whose connection is lost or times out may or may not have been applied: `admit` raises
`CountUnknown`, and gateway/ws.py admits the session and releases it when it ends, as a
counted one. Had Redis not applied it, that release is an under-count of one while the
user's other sessions here last (floored at 0); before, such a session got no release,
and had Redis applied it, the user was over-counted by one for as long as the gateway ran.
A count the line never wrote (it could not connect, or Redis refused the connection's AUTH:
storage/redisline.py `NotSent`) was not applied, and fails like a command error: admitted,
no release.

Connects that arrive together share a pipeline (three commands each; on a single Redis
written at once on a pipelined connection of the node's own, storage/redisline.py), at most
`MAX_ADMITS` connects a pipeline, so a storm of connects cannot build one unbounded one.
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
from storage.redisline import NotSent, RedisLine

KEY_TTL_S = 24 * 3600
MAX_ADMITS = 500  # connects counted in one pipeline (3 commands each)
COUNT_INTERVAL_S = 0.002  # between the starts of two counts (gateway/coalesce.py)

# KEYS: users' session hashes; ARGV[1]: this incarnation's field, ARGV[2]: the hashes' TTL,
# ARGV[2 + i]: how many sessions of KEYS[i] ended. A field that is gone is left gone (its
# sessions are no longer counted: lowering it would make it negative), one that reaches 0
# or less is deleted, and a hash left without a TTL gets one.
_RELEASE = """
local field, ttl = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('HGET', key, field))
  if n then
    local left = n - tonumber(ARGV[2 + i])
    if left > 0 then
      redis.call('HSET', key, field, left)
    else
      redis.call('HDEL', key, field)
    end
    if redis.call('TTL', key) == -1 then
      redis.call('EXPIRE', key, ttl)
    end
  end
end
return 0
"""


class CountUnknown(Exception):
    """A session may be counted though `admit` could not decide: its count went out and
    no reply came back (the connection was lost, or Redis did not answer in time: Redis
    may have applied it), or it was counted and reading the other nodes' liveness failed.
    The caller admits it and releases it when it ends."""


class UserConnectionCap:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        routes: Routes,
        node: str,
        cap: int,
        line: RedisLine | None = None,
    ) -> None:
        """`line` (a single Redis only): the pipelined connection the counts of connects
        go over instead of redis-py's pool (storage/redisline.py)."""
        self.redis = redis
        self.line = line if not keys.cluster else None
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
        # At most one count every COUNT_INTERVAL_S (a storm: larger, fewer round trips).
        self._counting: Coalescer[str, dict[Any, Any] | Exception] = Coalescer(
            self._count_many, max_batch=MAX_ADMITS, min_interval_s=COUNT_INTERVAL_S
        )
        self._release = redis.register_script(_RELEASE)

    async def admit(self, user: str) -> bool:
        """Count a new session of `user`; False (and not counted) when over the cap.
        Raises CountUnknown when the session may be counted (release it when it ends),
        another error when it was not counted."""
        if self.cap <= 0:
            return True
        try:
            counts = await self._counting.read(0, user)
        except NotSent:
            raise  # never written (no connection, or its AUTH refused): not counted
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise CountUnknown(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(counts, Exception):
            raise counts  # this user's count failed (the others' of its batch did not)
        try:
            total, dead = await self._live_total(counts)
            total -= self.releases.pending.get(user) or 0  # ended, decrement not sent yet
            if dead:
                await self.redis.hdel(self.keys.user_sessions(user), *dead)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            # Counted already: whatever failed after it, the session is to be released.
            raise CountUnknown(f"{type(exc).__name__}: {exc}") from exc
        if total > self.cap:
            self.refused += 1
            self.releases.add(user, 1)  # not counted after all: with the next decrements
            return False
        return True

    async def _count_many(self, _: int, users: list[str]) -> list[dict[Any, Any] | Exception]:
        """Count a session of each of `users` (a user twice: two sessions), and answer the
        user's hash after each: one pipeline for the connects that arrived together (on the
        line: one write). A command's error is that user's answer alone: the other users'
        HINCRBYs ran, so failing their connects too would leave them counted with no
        decrement to come (gateway/ws.py admits a connect whose count failed, without a
        release). A lost connection or a timeout still fails them all."""
        commands: list[tuple[Any, ...]] = []
        for user in users:
            key = self.keys.user_sessions(user)
            commands += [
                ("HINCRBY", key, self.field, 1),
                ("EXPIRE", key, KEY_TTL_S),
                ("HGETALL", key),
            ]
        line = self.line
        if line is not None:
            # Written at once on the line (storage/redisline.py).
            replies = await line.pipeline(commands, raise_on_error=False)
        else:
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
        answers: list[dict[Any, Any] | Exception] = []
        for i in range(len(users)):
            counted, _expire, found = replies[i * 3 : i * 3 + 3]
            if isinstance(counted, Exception):
                answers.append(counted)  # not counted: that connect fails, nothing to undo
            elif isinstance(found, Exception):
                # Counted, its hash not read: this node's count of the user is all we know.
                answers.append({self.field: counted})
            else:
                # RESP2's HGETALL is a flat list on the line (field, value...), a dict here.
                answers.append(found if isinstance(found, dict) else _pairs(found))
        return answers

    async def _live_total(self, counts: dict[Any, Any]) -> tuple[int, list[str]]:
        # max(0, ...): a negative field (left by an older version) must not make room.
        by_field = {_text(f): max(0, int(v)) for f, v in counts.items()}
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
        """Lower this node's field of each user's hash by the sessions that ended, never
        below 0 (`_RELEASE`). Retried as a whole on an error (gateway/batches.py): a batch
        Redis applied but whose reply was lost is applied twice, an under-count that the
        floor bounds (module docstring)."""
        if self.keys.cluster:
            # The keys of one script must share a slot, and users' hashes do not.
            for user, ended in batch.items():
                await self._release(
                    keys=[self.keys.user_sessions(user)], args=[self.field, KEY_TTL_S, ended]
                )
            return
        keys = [self.keys.user_sessions(user) for user in batch]
        await self._release(keys=keys, args=[self.field, KEY_TTL_S, *batch.values()])

    async def stop(self) -> None:
        await self.releases.stop()


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
