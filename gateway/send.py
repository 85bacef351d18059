"""The send path, shared by the WebSocket `send` and `POST .../messages`.

validate -> access -> idempotency + id (one Redis round trip) -> produce to Kafka keyed by
conversation (acks=all) -> `ack` only after the broker acknowledged.

Idempotency on (user, cid): the first send of a cid stores a *pending* record holding the
parts of its id; a retry gets that id back. The record turns *acked* after Kafka's ack.
When producing fails or times out the record turns *failed* but keeps its id: a timed-out
record may still reach the broker later (the producer keeps retrying it), so a retry of
the cid produces the very same message (same id, same ts) again, and whichever copy lands
first is stored; the other is a no-op under the (conversation, sender, cid) unique key.
So the client is never told an id other than the stored one, and never acked falsely.
A retry that finds the record pending (the first attempt still in flight) waits briefly
for the outcome. Behind Redis, the unique key also makes a duplicate that slipped through
(say, after a Redis flush) a no-op.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from fanout.envelope import encode_new_message
from gateway.access import Access
from gateway.limits import BucketMap
from storage.errors import BadRequest, Conflict, RateLimited, Unavailable
from storage.ids import SEQ_MASK, compose, now_ms, shard_of_id
from storage.models import NewMessage
from storage.redis_keys import RedisKeys

IDEMPOTENCY_TTL_S = 24 * 3600
PENDING_TTL_S = 30  # a gateway that dies mid-send leaves a pending record this long at most
PRODUCE_TIMEOUT_S = 5.0
PENDING_WAIT_S = 3.0


def _retrieve(task: asyncio.Future[Accepted]) -> None:
    # A send whose caller left: its outcome is in Redis; nobody awaits the exception.
    if not task.cancelled():
        task.exception()


# KEYS: idempotency key, id counter of the shard, the user's send counter for this second.
# ARGV: ms, conv, pending ttl, sends allowed per second (0: no limit).
# Returns {record, produce}: a new pending record "p|ms|n|conv" (produce = 1), a failed
# one taken over again as pending with its id unchanged (produce = 1), what exists
# (produce = 0), or {"", 2} when the user is over the cluster-wide send limit. A retry of
# a known cid is answered before the limit is counted: it is not a new message.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, 2) == 'f|' then
    v = 'p|' .. string.sub(v, 3)
    redis.call('SET', KEYS[1], v, 'EX', ARGV[3])
    return {v, 1}
  end
  return {v, 0}
end
local limit = tonumber(ARGV[4])
if limit > 0 then
  local c = redis.call('INCR', KEYS[3])
  if c == 1 then redis.call('PEXPIRE', KEYS[3], 2000) end
  if c > limit then return {'', 2} end
end
local n = redis.call('INCR', KEYS[2])
if n > 1000000000 then redis.call('SET', KEYS[2], 0) end
v = 'p|' .. ARGV[1] .. '|' .. n .. '|' .. ARGV[2]
redis.call('SET', KEYS[1], v, 'EX', ARGV[3])
return {v, 1}
"""


@dataclass(frozen=True, slots=True)
class Accepted:
    id: int
    ts: int


class SendPath:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        producer: AIOKafkaProducer,
        topic: str,
        access: Access,
        sends_per_s: int = 0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.producer = producer
        self.topic = topic
        self.access = access
        self._claim = redis.register_script(_CLAIM)
        # The fast path: a flood is refused here without touching Redis; the exact,
        # cluster-wide count per second is kept by the claim script (no extra round trip).
        self.sends_per_s = sends_per_s
        self._local = BucketMap(sends_per_s, 2 * sends_per_s)
        self._late: set[asyncio.Task[None]] = set()
        self.acked = 0

    async def send(self, user: str, conv: int, cid: str, body: str, kind: str) -> Accepted:
        """Accept one message; runs to its end even when the caller is cancelled (its
        client went away): a claimed cid must end acked or failed, or the client's retry
        would find it pending with nobody left to finish it."""
        task = asyncio.ensure_future(self._send(user, conv, cid, body, kind))
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _send(self, user: str, conv: int, cid: str, body: str, kind: str) -> Accepted:
        wait_ms = self._local.take(user, time.monotonic())
        if wait_ms:
            raise RateLimited("too many messages", retry_after_ms=wait_ms)
        conv_kind = await self.access.check(user, conv)
        if conv_kind == "thread":
            kind = "comment"  # every message of a post's thread is a comment
        elif kind == "comment":
            raise BadRequest("comments belong to a post's thread")
        key = self.keys.idempotency(user, cid)
        deadline = asyncio.get_running_loop().time() + PENDING_WAIT_S
        while True:
            record = await self._claim_or_get(key, conv, user)
            state, ms, n, stored_conv, created = record
            if stored_conv != conv:
                raise Conflict("this cid was already used for another conversation")
            msg_id = compose(ms, shard_of_id(conv), n & SEQ_MASK)
            if state == "a":
                return Accepted(msg_id, ms)
            if state == "p" and created:  # this attempt made the record: it produces
                message = NewMessage(conv, msg_id, user, cid, body, ms, kind)
                return await self._produce(key, message, record)
            # Someone else's attempt with this cid is in flight: wait for its outcome.
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable("an earlier send with this cid is still in flight")
            await asyncio.sleep(0.05)

    async def _claim_or_get(
        self, key: str, conv: int, user: str
    ) -> tuple[str, int, int, int, bool]:
        """(state, ms, n, conv, created_now) of the cid's record, creating it if absent."""
        ms = now_ms()
        try:
            raw, created = await self._claim(
                keys=[
                    key,
                    self.keys.id_counter(shard_of_id(conv)),
                    self.keys.rate("send", user, ms // 1000),
                ],
                args=[ms, conv, PENDING_TTL_S, self.sends_per_s],
            )
        except aioredis.RedisError as exc:
            raise Unavailable(f"redis unavailable: {type(exc).__name__}") from None
        if int(created) == 2:
            raise RateLimited("too many messages", retry_after_ms=max(1, 1000 - ms % 1000))
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        state, ms_s, n_s, conv_s = text.split("|")
        return state, int(ms_s), int(n_s), int(conv_s), bool(created)

    async def _produce(
        self, key: str, message: NewMessage, record: tuple[str, int, int, int, bool]
    ) -> Accepted:
        parts = f"{record[1]}|{record[2]}|{record[3]}"
        try:
            fut = await asyncio.wait_for(
                self.producer.send(
                    self.topic, encode_new_message(message), key=str(message.conv).encode()
                ),
                PRODUCE_TIMEOUT_S,
            )
        except (KafkaError, TimeoutError) as exc:
            await self._mark(key, f"f|{parts}")
            raise Unavailable(f"message broker unavailable: {type(exc).__name__}") from None
        # Not wait_for: cancelling the delivery future would not take the record back.
        done, _ = await asyncio.wait({fut}, timeout=PRODUCE_TIMEOUT_S)
        if not done or fut.exception() is not None:
            await self._mark(key, f"f|{parts}")
            if not done:
                # It may still be delivered; if so, a retry need not produce it again.
                fut.add_done_callback(lambda f: self._late_ack(f, key, f"a|{parts}"))
            else:
                fut.exception()  # retrieved: no "never retrieved" warning
            raise Unavailable("message broker unavailable: no acknowledgement in time")
        await self._mark(key, f"a|{parts}")
        self.acked += 1
        return Accepted(message.id, message.ts)

    async def _mark(self, key: str, value: str) -> None:
        try:
            await self.redis.set(key, value, ex=IDEMPOTENCY_TTL_S)
        except aioredis.RedisError:
            pass  # the pending record expires; the unique key in PostgreSQL still holds

    def _late_ack(self, fut: asyncio.Future[object], key: str, value: str) -> None:
        if not fut.cancelled() and fut.exception() is None:
            task = asyncio.get_running_loop().create_task(self._mark(key, value))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
