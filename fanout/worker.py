"""The fan-out worker: Kafka batch -> sequence + persist -> publish per node -> commit.

Persist-then-publish: a client never sees a message that could still be lost. Offsets are
committed last, and never past a message that is not stored yet, so a worker killed
anywhere leaves its uncommitted records to be redelivered to the group; the sequencer
recognises what was already stored and it is published again under its original seq
(gateways drop what a subscriber already has).

Shard isolation: when one shard is down, only its messages wait. They are held and retried
while the worker goes on with the other shards; the committed offset of a partition stops
at its oldest held record, so nothing is lost if the worker dies while holding them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from fanout.consumer import commit, run_consumer_process
from fanout.envelope import Delivery, EnvelopeError, decode_new_message
from fanout.kafka import fanout_group, messages_topic
from fanout.routing import Routes
from fanout.sequencer import sequence
from storage.models import Message, NewMessage
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from storage.settings import Settings

log = logging.getLogger("agora.fanout")

MAX_HELD = 50_000  # beyond this, stop taking new records until the shard is back
RETRY_PAUSE_S = 0.5


@dataclass(frozen=True, slots=True)
class Pending:
    tp: TopicPartition
    offset: int
    message: NewMessage


class FanoutWorker:
    def __init__(
        self,
        settings: Settings,
        pools: ShardPools,
        redis: aioredis.Redis,
        consumer: AIOKafkaConsumer,
    ) -> None:
        self.settings = settings
        self.pools = pools
        self.routes = Routes(redis, RedisKeys(settings.redis_prefix))
        self.consumer = consumer
        self.stopping = asyncio.Event()
        self.held: list[Pending] = []  # records whose shard was down, oldest first
        self.batches = 0
        self.messages = 0

    async def run(self) -> None:
        while not self.stopping.is_set():
            if len(self.held) >= MAX_HELD:
                records = {}
                await asyncio.sleep(RETRY_PAUSE_S)
            else:
                # With records held, come back soon to retry them even if no new ones arrive.
                timeout = 100 if self.held else 200
                records = await self.consumer.getmany(
                    timeout_ms=timeout, max_records=self.settings.fanout_batch_max
                )
            if records or self.held:
                await self.handle(records)

    async def handle(self, records: dict[TopicPartition, list]) -> None:  # type: ignore[type-arg]
        fresh: list[Pending] = []
        last: dict[TopicPartition, int] = {}
        for tp, recs in records.items():
            last[tp] = recs[-1].offset
            for rec in recs:
                try:
                    fresh.append(Pending(tp, rec.offset, decode_new_message(rec.value)))
                except EnvelopeError as exc:
                    # Poison record: log and skip it rather than block the partition forever.
                    log.error("skipping record %s@%d: %s", tp, rec.offset, exc)
        owned = self.consumer.assignment()
        # Held records of partitions taken away by a rebalance belong to their new owner.
        work = [p for p in self.held if p.tp in owned] + fresh
        if not work:
            await self._commit(last, [])
            return
        try:
            result, failed, errors = await sequence(self.pools, [p.message for p in work])
            await self.publish(result.in_order())
        except (OSError, aioredis.RedisError) as exc:
            # Redis down (publish) or an unexpected I/O failure: take it all again later.
            log.warning("batch of %d failed (%s); retrying", len(work), exc)
            self.held = work
            await self._commit(last, work)
            await asyncio.sleep(RETRY_PAUSE_S)
            return
        failed_ids = {id(m) for m in failed}
        self.held = [p for p in work if id(p.message) in failed_ids]
        if errors:
            log.warning(
                "%d messages held: %s", len(self.held), "; ".join(e.message for e in errors)
            )
        for orphan in result.orphans:
            log.warning("message %d for unknown conversation %d dropped", orphan.id, orphan.conv)
        await self._commit(last, self.held)
        self.batches += 1
        self.messages += len(work) - len(self.held)
        if self.held and not fresh:
            await asyncio.sleep(RETRY_PAUSE_S)

    async def _commit(self, last: dict[TopicPartition, int], held: list[Pending]) -> None:
        await commit(self.consumer, last, ((p.tp, p.offset) for p in held))

    async def publish(self, messages: list[Message]) -> None:
        if not messages:
            return
        by_conv: dict[int, list[Message]] = defaultdict(list)
        for m in messages:
            by_conv[m.conv].append(m)
        nodes, _ = await self.routes.nodes_for(convs=by_conv)
        deliveries: dict[str, Delivery] = {}
        for conv, msgs in by_conv.items():
            for node in nodes.get(conv, ()):
                deliveries.setdefault(node, Delivery()).messages.extend(msgs)
        await self.routes.publish(deliveries)


async def run_worker(settings: Settings) -> None:
    """A fan-out worker process."""
    worker = await run_consumer_process(
        settings,
        messages_topic(settings),
        fanout_group(settings),
        lambda pools, redis, consumer: FanoutWorker(settings, pools, redis, consumer),
        "fanout",
    )
    assert isinstance(worker, FanoutWorker)
    log.info("fanout worker stopped after %d batches", worker.batches)
