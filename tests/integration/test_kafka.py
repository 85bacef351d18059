"""fanout.kafka against the real broker: topics made once however many processes ask at
the same time, and a broker that never answers is given up on with a clear error."""

from __future__ import annotations

import asyncio
import logging
import secrets

import msgpack
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings
from fanout import deadletter
from fanout.deadletter import DeadLetters
from fanout.kafka import dlq_topic, ensure_topics, messages_topic, votes_topic, wait_for_broker
from tests.engines import free_port

pytestmark = pytest.mark.engines


async def test_topics_are_made_once_when_processes_ask_together(settings: Settings) -> None:
    fresh = settings.with_overrides(kafka_topic_prefix=f"kt{secrets.token_hex(3)}")
    wanted = {
        messages_topic(fresh),
        votes_topic(fresh),
        dlq_topic(fresh, "messages"),
        dlq_topic(fresh, "votes"),
    }
    # Three processes starting at once: whoever loses the race finds the topics made
    # ("already exists" is no error); none fails.
    made = await asyncio.gather(*(ensure_topics(fresh) for _ in range(3)))
    assert set().union(*map(set, made)) == wanted
    assert await ensure_topics(fresh) == []  # and later, nothing is missing
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        assert wanted <= set(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_broker_that_never_answers_is_given_up_on(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fanout.kafka")
    nowhere = settings.with_overrides(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match=r"kafka at 127\.0\.0\.1:\d+ unreachable"):
        await asyncio.wait_for(wait_for_broker(nowhere, seconds=0.3), 10)
    assert "waiting for kafka at" in caplog.text  # it retried before giving up


async def test_a_dead_letter_topic_with_unreadable_records_is_listed_with_them_marked(
    settings: Settings,
) -> None:
    fresh = settings.with_overrides(kafka_topic_prefix=f"dr{secrets.token_hex(3)}")
    assert await deadletter.read_all(fresh, "messages") == []  # no topic yet: nothing
    await ensure_topics(fresh)
    topic = dlq_topic(fresh, "messages")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        # What an operator or another tool could have put there: bytes that are not
        # msgpack, msgpack that is not a letter, a letter of another version; then a letter.
        for junk in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 99})):
            await producer.send_and_wait(topic, junk)
        tp = TopicPartition("t.messages", 3)
        await DeadLetters(producer, topic).send(tp, 7, b"k", b"\x93x", "why")
    finally:
        await producer.stop()
    got = await deadletter.read_all(fresh, "messages")
    assert [(offset, letter is None) for _, offset, letter in got] == [
        (0, True),
        (1, True),
        (2, True),
        (3, False),
    ]
    letter = got[3][2]
    assert letter is not None
    assert (letter.topic, letter.partition, letter.offset, letter.key, letter.value) == (
        "t.messages",
        3,
        7,
        b"k",
        b"\x93x",
    )
    assert letter.error == "why"
