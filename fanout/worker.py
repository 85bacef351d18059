"""The fan-out worker: Kafka batch -> sequence + persist -> publish per node -> commit.

Persist-then-publish: a client never sees a message that could still be lost. Offsets are
committed last, so a worker killed anywhere before the commit leaves the batch to be
redelivered to the group; the sequencer recognises what was already stored, and it is
published again under its original seq (gateways drop what a subscriber already has).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import defaultdict

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from fanout.envelope import Delivery, EnvelopeError, decode_new_message
from fanout.kafka import ensure_topics, fanout_group, make_consumer, messages_topic, wait_for_broker
from fanout.routing import Routes
from fanout.sequencer import sequence
from storage.errors import Unavailable
from storage.models import Message, NewMessage
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from storage.settings import Settings

log = logging.getLogger("agora.fanout")


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
        self.batches = 0
        self.messages = 0

    async def run(self) -> None:
        while not self.stopping.is_set():
            records = await self.consumer.getmany(
                timeout_ms=200, max_records=self.settings.fanout_batch_max
            )
            if not records:
                continue
            await self.handle(records)

    async def handle(self, records: dict[TopicPartition, list]) -> None:  # type: ignore[type-arg]
        batch: list[NewMessage] = []
        first: dict[TopicPartition, int] = {}
        last: dict[TopicPartition, int] = {}
        for tp, recs in records.items():
            first[tp] = recs[0].offset
            last[tp] = recs[-1].offset
            for rec in recs:
                try:
                    batch.append(decode_new_message(rec.value))
                except EnvelopeError as exc:
                    # Poison record: log and skip it rather than block the partition forever.
                    log.error("skipping record %s@%d: %s", tp, rec.offset, exc)
        try:
            result = await sequence(self.pools, batch)
            await self.publish(result.in_order())
        except (Unavailable, OSError, aioredis.RedisError) as exc:
            # Nothing is committed: rewind and take the same records again after a pause.
            log.warning("batch of %d failed (%s); retrying", len(batch), exc)
            for tp, offset in first.items():
                with contextlib.suppress(KafkaError, AssertionError):
                    self.consumer.seek(tp, offset)
            await asyncio.sleep(0.5)
            return
        for orphan in result.orphans:
            log.warning("message %d for unknown conversation %d dropped", orphan.id, orphan.conv)
        try:
            await self.consumer.commit({tp: off + 1 for tp, off in last.items()})
        except CommitFailedError:
            # The group rebalanced mid-batch; the new owner redelivers, which is harmless.
            log.info("commit failed after rebalance; batch will be redelivered")
        self.batches += 1
        self.messages += len(batch)

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
    """Composition root of a fan-out worker process."""
    await wait_for_broker(settings)
    await ensure_topics(settings)
    pools = ShardPools(settings)
    redis = aioredis.Redis.from_url(settings.redis_url)
    consumer = make_consumer(settings, messages_topic(settings), fanout_group(settings))
    await consumer.start()
    worker = FanoutWorker(settings, pools, redis, consumer)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    log.info("fanout worker started (group %s)", fanout_group(settings))
    try:
        await worker.run()
    finally:
        await consumer.stop()
        await redis.aclose()
        await pools.close()
        log.info("fanout worker stopped after %d batches", worker.batches)
