"""What the fan-out and scores workers share: committing offsets that never pass a record
not yet applied, and the process's composition root around a consumer (the loop itself is
`fanout.holding`).

Both workers hold records whose shard is down and retry them while going on with the
rest; a partition's committed offset must then stop at its oldest held record, so a
worker that dies while holding them leaves them to be redelivered.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from typing import Protocol

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from core.settings import Settings
from fanout.deadletter import DeadLetters
from fanout.kafka import dlq_topic, ensure_topics, make_consumer, make_producer, wait_for_broker
from storage.pools import ShardPools
from storage.redis_client import make_redis

log = logging.getLogger("agora.fanout")


def commit_offsets(
    last: dict[TopicPartition, int], held: Iterable[tuple[TopicPartition, int]]
) -> dict[TopicPartition, int]:
    """Offsets to commit: past the last record taken, but never past a held one."""
    floor: dict[TopicPartition, int] = {}
    for tp, offset in held:
        if tp not in floor or offset < floor[tp]:
            floor[tp] = offset
    offsets = {tp: floor.get(tp, off + 1) for tp, off in last.items()}
    for tp, off in floor.items():
        offsets.setdefault(tp, off)
    return offsets


async def commit(
    consumer: AIOKafkaConsumer,
    last: dict[TopicPartition, int],
    held: Iterable[tuple[TopicPartition, int]],
) -> None:
    offsets = commit_offsets(last, held)
    if not offsets:
        return
    try:
        await consumer.commit(offsets)
    except CommitFailedError:
        # The group rebalanced mid-batch; the new owner redelivers, which is harmless.
        log.info("commit failed after rebalance; records will be redelivered")
    except KafkaError as exc:
        log.warning("commit failed (%s); records will be redelivered", exc)


class Worker(Protocol):
    stopping: asyncio.Event

    def listener(self) -> ConsumerRebalanceListener: ...

    async def run(self) -> None: ...


async def run_consumer_process(
    settings: Settings,
    topic: str,
    group: str,
    build: Callable[[ShardPools, aioredis.Redis, AIOKafkaConsumer, DeadLetters], Worker],
    name: str,
) -> Worker:
    """The composition root of a worker process: the only place its pools, Redis client,
    consumer and dead-letter producer are made. Runs until SIGTERM/SIGINT; returns the
    worker (for its counts). `topic` is "<prefix>.<name>"; its dead letters go to
    "<prefix>.<name>.dlq"."""
    await wait_for_broker(settings)
    await ensure_topics(settings)
    pools = ShardPools(settings)
    redis = make_redis(settings)
    consumer = make_consumer(settings, topic, group)
    producer = make_producer(settings)
    await producer.start()
    which = topic.removeprefix(f"{settings.kafka_topic_prefix}.")
    worker = build(pools, redis, consumer, DeadLetters(producer, dlq_topic(settings, which)))
    # Subscribed again with the worker's listener: it learns of every revocation.
    consumer.subscribe([topic], listener=worker.listener())
    await consumer.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    log.info("%s worker started (group %s)", name, group)
    try:
        await worker.run()
    finally:
        await consumer.stop()
        await producer.stop()
        await redis.aclose()
        await pools.close()
    return worker
