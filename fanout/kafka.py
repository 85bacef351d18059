"""Kafka plumbing: topic names, idempotent topic creation, producer and consumer factories.

Only aiokafka is used, so Apache Kafka (production) and Tansu (dev/tests) run the same code.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core.settings import Settings
from fanout.metrics import MeteredConsumer, installed

log = logging.getLogger(__name__)


def messages_topic(settings: Settings) -> str:
    return f"{settings.kafka_topic_prefix}.messages"


def votes_topic(settings: Settings) -> str:
    return f"{settings.kafka_topic_prefix}.votes"


def dlq_topic(settings: Settings, which: str) -> str:
    """The dead-letter topic of `which` ("messages" or "votes"); see fanout.deadletter."""
    return f"{settings.kafka_topic_prefix}.{which}.dlq"


def fanout_group(settings: Settings) -> str:
    return f"{settings.kafka_topic_prefix}.fanout"


def scores_group(settings: Settings) -> str:
    return f"{settings.kafka_topic_prefix}.scores"


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the topics that do not exist yet (safe to run concurrently and repeatedly)."""
    # Dead-letter topics get one partition: an offset then names one record (`agora dlq`).
    wanted = {
        messages_topic(settings): settings.kafka_partitions,
        votes_topic(settings): settings.kafka_partitions,
        dlq_topic(settings, "messages"): 1,
        dlq_topic(settings, "votes"): 1,
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            response = await admin.create_topics([NewTopic(t, wanted[t], 1) for t in missing])
            failed = creation_errors(response.topic_errors)
            if failed:
                raise KafkaError(f"topics not created: {'; '.join(failed)}")
        return missing
    finally:
        await admin.close()


def creation_errors(topic_errors: list[tuple[Any, ...]]) -> list[str]:
    """What went wrong per topic in a CreateTopics answer. aiokafka does not raise for
    them: each topic's error code is in the answer. "Already exists" is no error here
    (another process won the race; the topic is what we wanted)."""
    failed: list[str] = []
    for topic, code, *rest in topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):
            message = rest[0] if rest else None  # CreateTopics v0 has no message
            failed.append(f"{topic}: error {code} ({message or 'no message'})")
    return failed


def make_producer(settings: Settings) -> AIOKafkaProducer:
    # acks=all: `ack` to a client only after every in-sync replica has the record.
    # linger_ms=0: a lone record goes out at once instead of waiting on a timer. Records
    # still share requests under load: the producer keeps one request in flight per
    # broker, and what is sent meanwhile goes out together in the next one. Measured
    # (bench/RESULTS.md, issue 14): ack p50 1.4-2.3 ms instead of 3.1-5.6 ms at 50-250
    # records/s, with the same number of requests.
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=0,
        request_timeout_ms=5000,
        retry_backoff_ms=100,
        max_batch_size=256 * 1024,
    )


def make_consumer(settings: Settings, topic: str, group: str) -> AIOKafkaConsumer:
    """A committing group consumer; metered (fanout.metrics) when the process installed it."""
    metrics = installed()
    extra: dict[str, Any] = {}
    cls = AIOKafkaConsumer
    if metrics is not None:
        cls = MeteredConsumer
        extra["metrics"] = metrics
    consumer: AIOKafkaConsumer = cls(
        topic,
        **extra,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.fanout_batch_max,
        # Apache Kafka answers a fetch as soon as a record arrives; Tansu only at the
        # wait's end, so the dev stack and the tests set a short one (core/settings.py).
        fetch_max_wait_ms=settings.kafka_fetch_wait_ms,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        rebalance_timeout_ms=6000,
    )
    return consumer


async def wait_for_broker(settings: Settings, seconds: float = 30) -> None:
    """Block until the broker answers metadata (processes may start before it)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"kafka at {settings.kafka_bootstrap} unreachable") from exc
            log.info("waiting for kafka at %s", settings.kafka_bootstrap)
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
