"""The send path, shared by the WebSocket `send` and `POST .../messages`.

validate -> access -> idempotency + id (one Redis round trip) -> produce to Kafka keyed by
conversation (acks=all) -> `ack` only after the broker acknowledged.

Idempotency on (user, cid): the first send of a cid stores a *pending* record holding the
parts of its id; a retry gets that id back. The record turns *acked* after Kafka's ack.
When producing fails or times out the record turns *failed* but keeps its id: a timed-out
record may still reach the broker later (the producer keeps retrying it), so a retry of
the cid produces the very same message (same id, same ts) again, and whichever copy lands
first is stored; the other is a no-op under the (conversation, sender, cid) unique key.
A retry that finds the record pending (the first attempt still in flight) waits briefly
for the outcome.

Redis keeps a record for the idempotency window only (AGORA_IDEMPOTENCY_WINDOW_S), and
may lose records (flush, restart without persistence, a gateway that died before marking
its record). So every attempt that produces also reads the shard's (conv, sender, cid)
row, concurrently with the produce (no extra latency, no extra Redis trip; the reads of
concurrent sends share one query, gateway/lookups.py): a stored row
is the answer, whatever id this attempt minted. A row that is not there yet but may be
on its way (Redis lost its data recently: gateway/idempotency.py) is waited for. So the
client is never told an id other than the stored one, and never acked falsely.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core.errors import BadRequest, Conflict, RateLimited, Unavailable
from fanout.envelope import encode_new_message
from gateway.access import Access
from gateway.idempotency import EpochWatch, Record, parse_record
from gateway.limits import BucketMap
from gateway.lookups import Found, StoredLookups
from gateway.produceline import ProduceLine
from gateway.sendorder import Turn
from storage.ids import SEQ_MASK, compose, decompose, now_ms, shard_of_id
from storage.models import NewMessage
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine

DEFAULT_WINDOW_S = 300
PENDING_TTL_S = 30  # a gateway that dies mid-send leaves a pending record this long at most
PRODUCE_TIMEOUT_S = 5.0
PENDING_WAIT_S = 3.0
# An attempt usually ends within a few seconds (every step is bounded); a pending record
# older than this is taken over by a retry instead of waiting out PENDING_TTL_S (a gateway
# killed or cut off from Redis mid-send). If its attempt was in fact still running, both
# produce the same id and the (conversation, sender, cid) key stores one.
PENDING_TAKEOVER_MS = 10_000
SETTLE_WAIT_S = 4.0  # longest a send waits for its copy to be stored (rare: see EpochWatch)
SETTLE_POLL_S = 0.05
REDIS_TIMEOUT_S = 5.0  # longest a send waits for one Redis command


# KEYS: idempotency key, id counter of the shard, the user's send counter for this second,
# the epoch (all under the user's send bucket's hash tag on a Redis Cluster: one slot).
# ARGV: ms, conv, pending ttl, sends allowed per second (0: no limit), the epoch to create
# if there is none, the number of send buckets and the user's (the bucket goes into the
# sequence's low bits: counters of different buckets never make the same id), and the
# time before which a pending record is stale: its attempt cannot still be running (its
# gateway died or lost Redis before marking it), so it is taken over like a failed one.
# Returns {record, produce, epoch}: a new pending record "p|ms|n|conv" (produce = 1), a
# failed (or stale pending) one taken over again as pending with its id unchanged
# (produce = 3), what exists
# (produce = 0), or {"", 2, epoch} when the user is over the cluster-wide send limit. A
# retry of a known cid is answered before the limit is counted: it is not a new message.
_CLAIM = """
local e = redis.call('GET', KEYS[4])
if not e then
  e = ARGV[5]
  redis.call('SET', KEYS[4], e)
end
local v = redis.call('GET', KEYS[1])
if v then
  local state = string.sub(v, 1, 2)
  local stale = state == 'p|' and tonumber(string.match(v, '^p|(%d+)|')) < tonumber(ARGV[8])
  if state == 'f|' or stale then
    v = 'p|' .. string.sub(v, 3)
    redis.call('SET', KEYS[1], v, 'EX', ARGV[3])
    return {v, 3, e}
  end
  return {v, 0, e}
end
local limit = tonumber(ARGV[4])
if limit > 0 then
  local c = redis.call('INCR', KEYS[3])
  if c == 1 then redis.call('PEXPIRE', KEYS[3], 2000) end
  if c > limit then return {'', 2, e} end
end
local c = redis.call('INCR', KEYS[2])
if c > 1000000000 then redis.call('SET', KEYS[2], 0) end
local n = c * tonumber(ARGV[6]) + tonumber(ARGV[7])
v = 'p|' .. ARGV[1] .. '|' .. n .. '|' .. ARGV[2]
redis.call('SET', KEYS[1], v, 'EX', ARGV[3])
return {v, 1, e}
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
        window_s: int = DEFAULT_WINDOW_S,
        line: RedisLine | None = None,
        produce_line: ProduceLine | None = None,
    ) -> None:
        """`line`: one pipelined connection for the claim and the record's SET, instead
        of `redis` (storage/redisline.py: a third of the client CPU per command).
        `produce_line`: the records go to the broker through it rather than through
        `producer` while it is usable (gateway/produceline.py: a fraction of the CPU)."""
        self.redis = redis
        self.line = line
        self.produce_line = produce_line
        self.keys = keys
        self.producer = producer
        self.topic = topic
        self.access = access
        self.pools = access.pools
        # The shard reads beside each produce: coalesced while one is in flight.
        self.lookups = StoredLookups(self.pools)
        self.window_s = window_s
        self._claim = redis.register_script(_CLAIM)
        self._claim_sha = line.script(_CLAIM) if line is not None else ""
        # The fast path: a flood is refused here without touching Redis; the exact,
        # cluster-wide count per second is kept by the claim script (no extra round trip).
        self.sends_per_s = sends_per_s
        self._local = BucketMap(sends_per_s, 2 * sends_per_s)
        # One epoch per send bucket (one in all on a single Redis): each bucket's keys
        # live on one cluster shard, whose failover loses that bucket's records only.
        self.epochs = [EpochWatch(window_s * 1000) for _ in range(keys.send_buckets)]
        self._token = secrets.token_hex(4)  # tells apart epochs made in the same ms
        self.acked = 0
        self.from_shard = 0  # answered with a stored message's id that Redis had forgotten
        self.settled = 0  # waited for the copy to be stored (Redis lost data recently)

    async def send(
        self,
        user: str,
        conv: int,
        cid: str,
        body: str,
        kind: str,
        ref: int | None = None,
        reply_to: int | None = None,
        turn: Turn | None = None,
    ) -> Accepted:
        """Accept one message (or an event of gateway/events.py: `ref` is its target);
        runs to its end even when the caller is cancelled (its client went away): a
        claimed cid must end acked or failed, or the client's retry would find it pending
        with nobody left to finish it. With a `turn` (gateway/sendorder.py) the message is
        handed to the producer only after the previous send of its connection was; the
        turn is released once this one's record is appended or it ends without one."""
        task = asyncio.ensure_future(self._send(user, conv, cid, body, kind, ref, reply_to, turn))
        task.add_done_callback(_consume)  # a caller that left: its outcome is in Redis
        if turn is not None:
            turn.held = True
            task.add_done_callback(lambda _: turn.release())
        return await asyncio.shield(task)

    async def _send(
        self,
        user: str,
        conv: int,
        cid: str,
        body: str,
        kind: str,
        ref: int | None = None,
        reply_to: int | None = None,
        turn: Turn | None = None,
    ) -> Accepted:
        wait_ms = self._local.take(user, time.monotonic())
        if wait_ms:
            raise RateLimited("too many messages", retry_after_ms=wait_ms)
        conv_kind = await self.access.check(user, conv)
        if conv_kind == "thread":
            if kind == "text":
                kind = "comment"  # every message of a post's thread is a comment
        elif kind == "comment":
            raise BadRequest("comments belong to a post's thread")
        key = self.keys.idempotency(user, cid)
        bucket = self.keys.send_bucket(user)
        deadline = asyncio.get_running_loop().time() + PENDING_WAIT_S
        while True:
            record, produce, fresh = await self._claim_or_get(key, conv, user, bucket)
            if record.conv != conv:
                raise Conflict("this cid was already used for another conversation")
            msg_id = compose(record.ms, shard_of_id(conv), record.n & SEQ_MASK)
            if record.state == "a":
                return Accepted(msg_id, record.ms)
            if record.state == "p" and produce:  # this attempt made the record: it produces
                message = NewMessage(conv, msg_id, user, cid, body, record.ms, kind, ref, reply_to)
                return await self._produce(key, message, record, fresh, self.epochs[bucket], turn)
            # Someone else's attempt with this cid is in flight: wait for its outcome.
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable("an earlier send with this cid is still in flight")
            await asyncio.sleep(0.05)

    async def _claim_or_get(
        self, key: str, conv: int, user: str, bucket: int
    ) -> tuple[Record, bool, bool]:
        """The cid's record, creating it if absent; whether this attempt must produce, and
        whether its id is new (not a failed attempt's taken over)."""
        ms = now_ms()
        try:
            # Bounded: a Redis cut off by the network hangs instead of failing. A claim
            # that did land leaves a pending record: a retry waits for it (PENDING_TTL_S).
            keys: list[str] = [
                key,
                self.keys.id_counter(shard_of_id(conv), bucket),
                self.keys.rate("send", user, ms // 1000),
                self.keys.epoch(bucket),
            ]
            args: list[str | int] = [
                ms,
                conv,
                PENDING_TTL_S,
                self.sends_per_s,
                f"{ms}-{self._token}",
                self.keys.send_buckets,
                bucket,
                ms - PENDING_TAKEOVER_MS,
            ]
            if self.line is not None:  # bounded by the line's own timeout
                raw, produce, epoch = await self.line.evalsha(self._claim_sha, keys, args)
            else:
                # asyncio.timeout, not wait_for: no task of its own per command.
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    raw, produce, epoch = await self._claim(keys=keys, args=args)
        except (aioredis.RedisError, TimeoutError) as exc:
            raise Unavailable(f"redis unavailable: {type(exc).__name__}") from None
        self.epochs[bucket].observe(_text(epoch), ms)
        if int(produce) == 2:
            raise RateLimited("too many messages", retry_after_ms=max(1, 1000 - ms % 1000))
        return parse_record(_text(raw)), int(produce) in (1, 3), int(produce) == 1

    async def _produce(
        self,
        key: str,
        message: NewMessage,
        record: Record,
        fresh: bool,
        watch: EpochWatch,
        turn: Turn | None = None,
    ) -> Accepted:
        """Produce the message and, meanwhile, read the shard for a copy stored earlier;
        answer with the id that is (or will be) stored."""
        ours = Accepted(message.id, message.ts)
        epoch = watch.epoch
        # A future, not a task: the read is coalesced (gateway/lookups.py) and answered
        # by the coalescer's own task. `proofs`: what the epoch watch had proven when the
        # read went out (a pair proven later says nothing about this read).
        lookup = self.lookups.ask(message.conv, message.sender, message.cid)
        lookup.add_done_callback(_consume)
        proofs = watch.proofs
        try:
            partition = await self._publish(message, turn)
        except Unavailable:
            try:
                found = await _found(lookup)
            except Unavailable:
                found = None
            if found is None:
                await self._mark(key, record.value("f"))
                raise
            return await self._answer(key, found, ours, record)
        try:
            found = await _found(lookup)
            # A pair proven since the read went out proves nothing about that read (it
            # may predate the earlier copy's storing): it waits as if still suspect.
            if found is None and (
                watch.suspect(partition, self.pools.for_id(message.conv), now_ms())
                or watch.proofs != proofs
            ):
                found = await self._settle(message)
                # Proof only if the stored copy is the one just produced: a new id has
                # no older copy (a failed attempt's taken-over id may have one).
                if fresh and found == ours:
                    watch.clear(epoch, partition, self.pools.for_id(message.conv))
        except Unavailable:
            # Produced, but whether an earlier copy holds the cid is unknown: the record
            # keeps this id and a retry produces it again and looks again.
            await self._mark(key, record.value("f"))
            raise
        return await self._answer(key, found or ours, ours, record)

    async def _answer(self, key: str, stored: Accepted, ours: Accepted, record: Record) -> Accepted:
        if stored == ours:
            await self._mark(key, record.value("a"))
        else:
            # The record names the stored message from now on (its id's parts).
            self.from_shard += 1
            parts = decompose(stored.id)
            await self._mark(key, Record("a", parts.ms, parts.seq, record.conv).value())
        self.acked += 1
        return stored

    async def _publish(self, message: NewMessage, turn: Turn | None = None) -> int:
        """Produce (after the previous send of the connection, given its `turn`) and wait
        for the broker's ack; its partition. Unavailable otherwise."""
        loop = asyncio.get_running_loop()
        # One bound for the turn and the append: the time from the claim to the record
        # being in the producer stays what it was when a connection's sends were handled
        # one at a time (a pending record must not outlive its attempt). A timeout scope
        # only around what may wait: a lone send's turn is free and the line takes its
        # record at once (a scope is a timer handle and ~5 us of Python per send).
        deadline = loop.time() + PRODUCE_TIMEOUT_S
        turn_came = False
        try:
            if turn is not None and not turn.free():
                async with asyncio.timeout_at(deadline):
                    await turn.wait()
            turn_came = True
            value = encode_new_message(message)
            key = str(message.conv).encode()
            line = self.produce_line
            fut: asyncio.Future[Any] | None = None
            if line is not None:
                fut = line.send(key, value)  # handed over in call order, like send()
            if fut is None:
                async with asyncio.timeout_at(deadline):
                    if line is not None:
                        # After a failure of the line: behind its records, which it is
                        # handing to the producer (the partition's order is kept).
                        await line.settled()
                    fut = await self.producer.send(self.topic, value, key=key)
                if line is not None:
                    line.track(key, fut)  # the line's records wait for it
        except (KafkaError, TimeoutError) as exc:
            if not turn_came:
                raise Unavailable("an earlier send of this connection is still in flight") from None
            raise Unavailable(f"message broker unavailable: {type(exc).__name__}") from None
        finally:
            if turn is not None:
                turn.release()  # appended (or never will be): the next send may produce
        # Not wait_for: cancelling the delivery future would not take the record back. A
        # copy acknowledged after this gives up is stored under this record's id, which
        # the failed record keeps: the retry produces it again and finds it on the shard.
        if not await _done_within(fut, PRODUCE_TIMEOUT_S):
            fut.add_done_callback(_consume)
            raise Unavailable("message broker unavailable: no acknowledgement in time")
        failure = fut.exception()
        if failure is not None:
            raise Unavailable(f"message broker unavailable: {type(failure).__name__}")
        # RecordMetadata, from the line as from the producer.
        partition: int = fut.result().partition
        return partition

    async def _stored(self, message: NewMessage) -> Accepted | None:
        return await _found(self.lookups.ask(message.conv, message.sender, message.cid))

    async def _settle(self, message: NewMessage) -> Accepted:
        """Wait until the shard holds the cid (this copy or an earlier one)."""
        self.settled += 1
        deadline = asyncio.get_running_loop().time() + SETTLE_WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(SETTLE_POLL_S)
            found = await self._stored(message)
            if found is not None:
                return found
        raise Unavailable("the message is accepted but not stored yet; retry with its cid")

    async def _mark(self, key: str, value: str) -> None:
        if self.line is not None:
            # Written, not waited for: the ack goes out without Redis's reply (a failure
            # changed nothing before either: see below), and Redis is asked for none
            # (storage/redisline.py: no wake-up to read it). This node's later commands on
            # the line (a retry's claim) run after it; a retry through another node that
            # still finds the record pending waits for it (PENDING_WAIT_S).
            self.line.send("SET", key, value, "EX", self.window_s)
            return
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self.redis.set(key, value, ex=self.window_s)
        except (aioredis.RedisError, TimeoutError):
            pass  # the pending record expires; a retry then reads the shard


async def _done_within(fut: asyncio.Future[Any], timeout_s: float) -> bool:
    """Whether `fut` is done within `timeout_s`, never cancelling it: `asyncio.wait({fut},
    timeout)` without its sets, counter and closures (~5 us less per send)."""
    if fut.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(fut.done())

    timer = loop.call_later(timeout_s, wake, None)
    fut.add_done_callback(wake)
    try:
        return await waiter
    finally:
        timer.cancel()
        fut.remove_done_callback(wake)


async def _found(lookup: asyncio.Future[Found]) -> Accepted | None:
    """A shard read's answer (gateway/lookups.py)."""
    try:
        found = await lookup
    except Unavailable:
        raise
    except Exception as exc:
        # Any failure of this read (a cancelled statement, a read-only standby...)
        # means the same to the client: not known yet, retry with the same cid.
        raise Unavailable(f"storage unavailable: {type(exc).__name__}") from None
    return None if found is None else Accepted(found[0], found[1])


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _consume(fut: asyncio.Future[Any]) -> None:
    """For a future nobody awaits (a send whose caller left, a lookup or delivery report no
    longer needed): its exception is retrieved, so asyncio logs no "never retrieved"."""
    if not fut.cancelled():
        fut.exception()
