"""What the fan-out and scores workers share: committing offsets that never pass a record
not yet applied, and the process's composition root around a consumer (the loop itself is
`fanout.holding`).

Both workers hold records whose shard is down and retry them while going on with the
rest; a partition's committed offset must then stop at its oldest held record, so a
worker that dies while holding them leaves them to be redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from storage import shardwatch
from storage.pools import ShardPools
from storage.redis_client import make_redis

log = logging.getLogger("agora.fanout")

# aiokafka's records, at ERROR, about an offset commit the broker refused: each is then
# raised to the commit's caller (`_commit`, which handles every Kafka error: the records
# are redelivered) or retried by aiokafka itself (a retriable error). A group's or a
# topic's authorization failure is left at ERROR: it lasts until an operator acts.
COORDINATOR_LOGGER = "aiokafka.consumer.group_coordinator"
HANDLED_COMMIT_FAILURES = frozenset(
    {
        "OffsetCommit failed for group %s due to group error (%s), will rejoin",
        "OffsetCommit failed for group %s on partition %s with offset %s: %s",
    }
)


class HandledCommitFailures(logging.Filter):
    """Lowers aiokafka's ERROR records of commit failures the worker handles to WARNING:
    they are not errors of the process, yet every log check had to declare them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if (
            record.levelno == logging.ERROR
            and isinstance(msg, str)
            and msg in HANDLED_COMMIT_FAILURES
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def lower_handled_commit_failures() -> None:
    """Install HandledCommitFailures (once) on aiokafka's group coordinator logger: a
    logger's filters see only the records logged on that very logger, not its children's,
    so it goes there rather than on "aiokafka". For a process whose every commit goes
    through `_commit` (a worker's)."""
    logger = logging.getLogger(COORDINATOR_LOGGER)
    if not any(isinstance(f, HandledCommitFailures) for f in logger.filters):
        logger.addFilter(HandledCommitFailures())


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


async def _commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    if not offsets:
        return
    try:
        await consumer.commit(offsets)
    except CommitFailedError:
        # The group rebalanced mid-batch; the new owner redelivers, which is harmless.
        log.info("commit failed after rebalance; records will be redelivered")
    except KafkaError as exc:
        log.warning("commit failed (%s); records will be redelivered", exc)


class Committer:
    """Offset commits off the worker's loop: one request in flight, at most one per
    `interval_s`, each carrying the newest offsets asked for.

    A commit is off the delivery path (a batch's records are stored and published before
    it is asked for), so the worker fetches its next batch instead of waiting for the
    broker's answer, and a busy worker sends one commit per interval instead of one per
    batch (each costs the broker and the worker about as much as a one-record produce).
    Offsets only grow between requests (they are computed from the whole state each time,
    never past an unfinished record), so the newest supersedes the ones not yet sent. What
    a crash costs is the commit only: the records of the last interval are redelivered and
    the sequencer recognises them."""

    def __init__(self, consumer: AIOKafkaConsumer, interval_s: float) -> None:
        self.consumer = consumer
        self.interval_s = interval_s
        self.sent = 0  # commit requests made (for tests and the bench)
        self._pending: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_start = float("-inf")

    def request(
        self, last: dict[TopicPartition, int], held: Iterable[tuple[TopicPartition, int]]
    ) -> None:
        """Commit past `last` on each partition, never past a `held` offset, soon."""
        offsets = commit_offsets(last, held)
        if offsets:
            self._pending = offsets
            self._kick()

    def drop(self) -> None:
        """Forget what was asked and not sent: it was computed for an assignment now gone
        (a commit in flight is left to finish: its records are done)."""
        self._pending = {}
        self._cancel_timer()

    async def flush(self, timeout_s: float) -> None:
        """Send what is pending now and wait for it and the commit in flight, at most
        `timeout_s` (before a rebalance takes the partitions, and before stopping)."""
        self._cancel_timer()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                if self._task is not None:
                    await asyncio.shield(self._task)
                offsets, self._pending = self._pending, {}
                if offsets:
                    self.sent += 1
                    await _commit(self.consumer, offsets)

    def _kick(self) -> None:
        if not self._pending or (self._task is not None and not self._task.done()):
            return  # the commit in flight sends the pending offsets when it ends
        loop = asyncio.get_running_loop()
        wait = self._last_start + self.interval_s - loop.time()
        if wait > 0:
            if self._timer is None:
                self._timer = loop.call_later(wait, self._due)
            return
        offsets, self._pending = self._pending, {}
        self._last_start = loop.time()
        self.sent += 1
        self._task = asyncio.ensure_future(_commit(self.consumer, offsets))
        self._task.add_done_callback(self._ended)

    def _due(self) -> None:
        self._timer = None
        self._kick()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # `_commit` handles every Kafka error; anything else is a bug: say it loudly.
            log.error("offset commit failed", exc_info=task.exception())
        self._kick()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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
    lower_handled_commit_failures()  # its consumer commits only through a Committer
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
    watching = (
        asyncio.create_task(shardwatch.watch(settings, pools)) if settings.shard_file else None
    )
    try:
        await worker.run()
    finally:
        if watching is not None:
            watching.cancel()
        await consumer.stop()
        await producer.stop()
        await redis.aclose()
        await pools.close()
    return worker
