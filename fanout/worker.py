"""The fan-out worker: Kafka batch -> sequence + persist -> publish per node -> commit.

Persist-then-publish: a client never sees a message that could still be lost. Offsets are
committed last, and never past a message that is not stored yet, so a worker killed
anywhere leaves its uncommitted records to be redelivered to the group; the sequencer
recognises what was already stored and it is published again under its original seq
(gateways drop what a subscriber already has).

Shard isolation: when one shard is down or fails transiently, only its messages wait.
They are held and retried with backoff while the worker goes on with the other shards; the
committed offset of a partition stops at its oldest held record, so nothing is lost if the
worker dies while holding them. Behind a shard move's fence only the fenced logical
shards' messages wait, each shard's under its own backoff (`fanout.sequencer` splits the
refused batch), and the rest of their database goes on. A message no database will ever
take goes to the dead-letter topic. The holding, backoff, offset checks and dead letters
are `fanout.holding`'s, shared with the scores worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import replace

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from core.errors import NotFound, Unavailable
from core.settings import Settings
from fanout.consumer import run_consumer_process
from fanout.deadletter import DeadLetters
from fanout.envelope import EnvelopeError, decode_new_message
from fanout.holding import HoldingWorker, Outcome, PoisonRecord, Raw, Record, fenced_key
from fanout.kafka import fanout_group, messages_topic
from fanout.notify import notify
from fanout.routing import Routes
from fanout.sequencer import Sequenced, sequence
from storage.ids import shard_of_id
from storage.models import Message, NewMessage
from storage.pgerrors import describe
from storage.pools import ShardPools
from storage.redis_client import make_line
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine

log = logging.getLogger("agora.fanout")

MAX_HELD = 50_000  # beyond this, stop taking new records until the shard is back
# A physical shard that has not answered a batch within this is treated as failing for
# the round (a host cut off by the network hangs instead of failing): the other shards do
# not wait for it, and it gets no new attempt until the one in flight ends.
SLOW_SHARD_S = 1.0


class FanoutWorker(HoldingWorker[NewMessage]):
    group = "fanout"

    def __init__(
        self,
        settings: Settings,
        pools: ShardPools,
        redis: aioredis.Redis,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters | None = None,
        line: RedisLine | None = None,
    ) -> None:
        """`line`: the pipelined Redis connection each batch's publish goes over
        (storage/redisline.py; `make_line`), else redis-py's pool."""
        super().__init__(settings, consumer, dead_letters)
        self.pools = pools
        keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
        self.routes = Routes(redis, keys, line)
        self.max_held = MAX_HELD
        self.slow: dict[int, asyncio.Future[Sequenced]] = {}  # physical -> attempt in flight

    def decode(self, raw: Raw) -> NewMessage:
        try:
            return decode_new_message(raw.value)
        except EnvelopeError as exc:
            raise PoisonRecord(str(exc)) from None

    def hold_key(self, item: NewMessage) -> str:
        database = self._database_key(item)
        # While a move's fence holds a logical shard's messages (under their own key), a
        # later message of that shard waits with them: stored first, it would take a seq
        # before them. The key stops failing once they went through.
        fenced = fenced_key(shard_of_id(item.conv))
        return fenced if self.backoff.failing(fenced) else database

    def _database_key(self, item: NewMessage) -> str:
        try:
            return self.pools.names[self.pools.for_id(item.conv)]
        except NotFound:
            raise PoisonRecord(f"conversation id {item.conv} names no shard") from None

    async def apply_batch(self, work: list[Record[NewMessage]]) -> Outcome[NewMessage]:
        self.slow = {p: t for p, t in self.slow.items() if not t.done()}
        # A shard with a slow attempt still in flight: its records stay held, untried.
        busy = [r for r in work if self.pools.for_id(r.item.conv) in self.slow]
        now = [r for r in work if self.pools.for_id(r.item.conv) not in self.slow]
        result = await sequence(self.pools, [r.item for r in now], SLOW_SHARD_S, self.slow)
        by_message = {id(r.item): r for r in work}
        out: Outcome[NewMessage] = Outcome(failures=dict(result.errors))
        # Held for their database (down, failing) or, behind a move's fence, for their
        # logical shard only: the rest of that database went on.
        out.held = [
            replace(r, hold=self._database_key(r.item))
            for r in (by_message[id(m)] for m in result.held)
        ] + [
            replace(r, hold=fenced_key(shard_of_id(r.item.conv)))
            for r in (by_message[id(m)] for m in result.fenced)
        ]
        for r in busy:
            key = self.hold_key(r.item)
            out.held.append(replace(r, hold=key))
            out.failures[key] = "an earlier attempt on this shard is still running"
        out.poison = [(by_message[id(m)], why) for m, why in result.poison]
        try:
            await self.publish(result.in_order())
            await notify(self.routes, self.pools, result.stored, result.redelivered)
        except (OSError, aioredis.RedisError, Unavailable, asyncpg.PostgresError) as exc:
            # Stored but not published, or a direct message's inbox entry not written (its
            # database failed after the commit): hold it all; the retry finds the messages
            # stored (redelivered), publishes them under their seq and writes the entry
            # (a second write is a no-op). Nothing new waits behind these: they are stored.
            key = "redis" if isinstance(exc, (OSError, aioredis.RedisError)) else "inbox"
            left = {(r.tp, r.offset) for r in out.held} | {(r.tp, r.offset) for r, _ in out.poison}
            out.held += [replace(r, hold=key) for r in work if (r.tp, r.offset) not in left]
            out.failures[key] = describe(exc) if key == "inbox" else repr(exc)
        return out

    async def publish(self, messages: list[Message]) -> None:
        if not messages:
            return
        by_conv: dict[int, list[Message]] = defaultdict(list)
        for m in messages:
            by_conv[m.conv].append(m)
        # Routes read now, after the commit: a subscriber that registered meanwhile gets it.
        await self.routes.publish_messages(by_conv)


async def run_worker(settings: Settings) -> None:
    """A fan-out worker process."""
    # A batch's publish is one script call: over the pipelined connection its client side
    # costs a third of redis-py's (bench/RESULTS.md, issue 14, "the worker's per-batch CPU").
    line = make_line(settings)
    try:
        worker = await run_consumer_process(
            settings,
            messages_topic(settings),
            fanout_group(settings),
            lambda pools, redis, consumer, dlq: FanoutWorker(
                settings, pools, redis, consumer, dlq, line
            ),
            "fanout",
        )
    finally:
        if line is not None:
            line.close()
    assert isinstance(worker, FanoutWorker)
    log.info(
        "fanout worker stopped after %d batches, %d messages, %d dead-lettered",
        worker.batches,
        worker.done,
        worker.dead_lettered,
    )
