"""Offset commits go out in the background, coalesced, and are never lost at a rebalance or
a stop (fanout.consumer.Committer), and one the broker refuses is handled, logged as a
warning. Real broker, PostgreSQL and Redis; one worker per test on a topic of its own."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from core.settings import Settings
from fanout.consumer import COORDINATOR_LOGGER, Committer, lower_handled_commit_failures
from fanout.kafka import ensure_topics, fanout_group, make_consumer, messages_topic
from fanout.worker import FanoutWorker
from storage import messages
from storage.ids import IdGenerator
from storage.pools import ShardPools
from tests.integration.test_worker_faults import produce_text, wait_for

pytestmark = pytest.mark.engines


class Topic:
    """A topic of its own, one conversation, a producer; workers started on demand."""

    def __init__(self, settings: Settings, pools: ShardPools, redis: aioredis.Redis, ms: int):
        prefix = f"commit{secrets.token_hex(3)}"
        self.settings = settings.with_overrides(
            kafka_topic_prefix=prefix, worker_commit_interval_ms=ms
        )
        self.pools, self.redis = pools, redis
        self.topic = messages_topic(self.settings)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        self.ids = IdGenerator()
        self.conv = self.ids.next_id(9)
        self.running: list[tuple[FanoutWorker, asyncio.Task[None]]] = []

    async def __aenter__(self) -> Topic:
        await ensure_topics(self.settings)
        await self.producer.start()
        async with self.pools.transaction(self.pools.for_id(self.conv)) as conn:
            await conn.execute(
                "INSERT INTO conversations (id, kind, created_by) VALUES ($1, 'group', 'x')",
                self.conv,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker, task in list(self.running):
            await self.stop(worker, task)
        await self.producer.stop()

    async def start(self) -> tuple[FanoutWorker, asyncio.Task[None]]:
        consumer = make_consumer(self.settings, self.topic, fanout_group(self.settings))
        worker = FanoutWorker(self.settings, self.pools, self.redis, consumer)
        consumer.subscribe([self.topic], listener=worker.listener())
        await consumer.start()
        task = asyncio.create_task(worker.run())
        self.running.append((worker, task))
        return worker, task

    async def stop(self, worker: FanoutWorker, task: asyncio.Task[None]) -> None:
        self.running.remove((worker, task))
        worker.stopping.set()
        await task
        await worker.consumer.stop()

    async def send(self, i: int) -> TopicPartition:
        meta = await produce_text(self.producer, self.topic, self.ids, self.conv, i)
        return TopicPartition(self.topic, meta.partition)

    async def until_stored(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while len(await messages.after(self.pools, self.conv, 0, 100)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} stored"
            await asyncio.sleep(0.02)


async def one_batch_each(t: Topic, worker: FanoutWorker, n: int) -> TopicPartition:
    """Send `n` records, each after the previous one is stored: `n` batches."""
    tp = TopicPartition(t.topic, 0)
    for i in range(n):
        tp = await t.send(i)
        await t.until_stored(i + 1)
        await wait_for(lambda i=i: worker.batches >= i + 1, 10, "the batch to end")
    return tp


async def test_a_busy_worker_sends_one_commit_per_interval_not_one_per_batch(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    async with Topic(settings, pools, redis_client, 1500) as t:
        worker, _ = await t.start()
        started = time.monotonic()
        tp = await one_batch_each(t, worker, 8)
        elapsed = time.monotonic() - started
        # The last offsets arrive at most one interval later, without another batch.
        deadline = time.monotonic() + 10
        while await worker.consumer.committed(tp) != 8:
            assert time.monotonic() < deadline, f"committed {await worker.consumer.committed(tp)}"
            await asyncio.sleep(0.05)
        assert worker.batches >= 8
        # One at once, then at most one per 1.5 s interval of the run, and the one after it.
        assert worker.commits.sent <= 2 + int(elapsed / 1.5), (worker.commits.sent, elapsed)


async def test_a_stopping_worker_commits_what_it_finished_at_once(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    # An interval far longer than the test: only the stop can send the last offsets.
    async with Topic(settings, pools, redis_client, 60_000) as t:
        worker, task = await t.start()
        tp = await one_batch_each(t, worker, 3)
        assert await worker.consumer.committed(tp) in (None, 1)  # the first commit only
        worker.stopping.set()
        await task
        assert await worker.consumer.committed(tp) == 3
        t.running.remove((worker, task))
        await worker.consumer.stop()


async def test_a_rebalance_commits_what_was_finished_before_the_partitions_move(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    async with Topic(settings, pools, redis_client, 60_000) as t:
        a, a_task = await t.start()
        tp = await one_batch_each(t, a, 3)
        generation = a.generation
        b, _ = await t.start()
        # Every partition is revoked from `a` at the rebalance: its listener sends the
        # pending offsets first, so the new owner starts after the finished records.
        await wait_for(lambda: a.generation > generation, 30, "the rebalance")
        assert await a.consumer.committed(tp) == 3
        await t.stop(a, a_task)
        await t.send(3)
        await t.until_stored(4)
        await wait_for(lambda: b.done >= 1, 30, "b to take the new record")
        # `b` took the new record only: nothing finished was redelivered to it.
        assert b.done == 1
        got = await messages.after(pools, t.conv, 0, 10)
        assert [(m.cid, m.seq) for m in got] == [(f"c{i}", i + 1) for i in range(4)]


async def test_a_commit_the_broker_refuses_is_handled_and_logged_as_a_warning(
    settings: Settings,
    pools: ShardPools,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A commit the broker refuses: one from a consumer outside the group while the group
    # has a member (the worker), which the broker answers UNKNOWN_MEMBER_ID, as it does a
    # worker's commit after the group moved on without it. aiokafka logs that at ERROR and
    # raises CommitFailedError, which the committer handles (the records would be
    # redelivered); a worker process (run_consumer_process) lowers aiokafka's record to
    # WARNING, so no log check has to declare it as an expected error.
    caplog.set_level(logging.INFO)
    coordinator = logging.getLogger(COORDINATOR_LOGGER)
    installed = set(coordinator.filters)
    lower_handled_commit_failures()
    try:
        async with Topic(settings, pools, redis_client, 0) as t:
            worker, _ = await t.start()
            tp = await one_batch_each(t, worker, 2)
            deadline = time.monotonic() + 10
            while await worker.consumer.committed(tp) != 2:
                assert time.monotonic() < deadline, "the worker's own commits did not land"
                await asyncio.sleep(0.05)
            outsider = AIOKafkaConsumer(
                bootstrap_servers=t.settings.kafka_bootstrap,
                group_id=fanout_group(t.settings),
                enable_auto_commit=False,
            )
            outsider.assign([tp])
            await outsider.start()
            try:
                start = len(caplog.records)
                commits = Committer(outsider, 0)
                commits.request({tp: 0}, [])  # past offset 0: would move the group back
                await commits.flush(10)
                records = caplog.records[start:]
            finally:
                await outsider.stop()
            assert commits.sent == 1
            assert await worker.consumer.committed(tp) == 2  # refused indeed
    finally:
        for f in set(coordinator.filters) - installed:
            coordinator.removeFilter(f)
    refused = [r for r in records if r.getMessage().startswith("OffsetCommit failed")]
    assert [(r.name, r.levelname) for r in refused] == [(COORDINATOR_LOGGER, "WARNING")]
    assert "UnknownMemberIdError" in refused[0].getMessage()
    handled = "commit failed after rebalance; records will be redelivered"
    assert [r.levelname for r in records if r.getMessage() == handled] == ["INFO"]
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
