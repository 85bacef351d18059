"""`fanout.positions.position_now` on a real consumer (Tansu): the position when the
consumer knows it, None when it would have to wait for it or the partition is not ours,
and nothing left behind (no coroutine never awaited, no waiter)."""

from __future__ import annotations

import asyncio
import gc
import secrets
import warnings

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.settings import Settings
from fanout.kafka import ensure_topics, messages_topic
from fanout.positions import position_now

pytestmark = pytest.mark.engines


async def test_the_position_when_known_none_when_it_would_wait(settings: Settings) -> None:
    own = settings.with_overrides(kafka_topic_prefix=f"pos{secrets.token_hex(3)}")
    await ensure_topics(own)
    tp = TopicPartition(messages_topic(own), 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=own.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a coroutine left unawaited would warn
            assert position_now(consumer, tp) is None  # not assigned
            consumer.assign([tp])
            consumer.seek(tp, 0)
            assert position_now(consumer, tp) == 0  # known: from memory
            # Awaited, the same answer.
            assert await consumer.position(tp) == 0
            # A reset asked for and not answered yet: position() would wait for it.
            reset = asyncio.ensure_future(consumer.seek_to_end(tp))
            await asyncio.sleep(0)
            assert not reset.done()
            assert position_now(consumer, tp) is None
            gc.collect()
            # The reset still happens for whoever waits for it.
            await reset
            assert await consumer.position(tp) == 0  # an empty partition's end
        consumer.seek(tp, 3)
        assert position_now(consumer, tp) == 3
    finally:
        await consumer.stop()
