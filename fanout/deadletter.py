"""Dead-letter topics: where a record that can never be applied goes instead of the floor.

`<prefix>.messages.dlq` and `<prefix>.votes.dlq` (one partition each, so an offset names
one record) receive a poison record as a small MessagePack wrapper around the original:

    key   = the original record's key (unchanged)
    value = {"v": 1, "topic": str, "partition": int, "offset": int, "key": bytes | None,
             "value": bytes, "error": str, "at": ms since the epoch}

A wrapper rather than Kafka headers: every field travels with the value, so `agora dlq`
and any other reader need nothing but the bytes. Produced with acks=all; the worker
commits its offset past the original only after this produce was acknowledged.
`agora dlq replay` produces `key`/`value` unchanged to `topic` again, once the cause is
fixed (a message is recognised by its (conversation, sender, cid) key if it was stored
after all; a vote record names a vote row, counted once however often it is named).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from core.settings import Settings
from fanout.envelope import EnvelopeError
from fanout.kafka import dlq_topic

VERSION = 1
SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    error: str
    at: int  # ms since the epoch


def encode(d: DeadLetter) -> bytes:
    out: bytes = msgpack.packb(
        {
            "v": VERSION,
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "key": d.key,
            "value": d.value,
            "error": d.error,
            "at": d.at,
        },
        use_bin_type=True,
    )
    return out


def decode(data: bytes) -> DeadLetter:
    try:
        o = msgpack.unpackb(data, raw=False)
        if not isinstance(o, dict) or o.get("v") != VERSION:
            raise ValueError("not a dead letter")
        return DeadLetter(
            topic=str(o["topic"]),
            partition=int(o["partition"]),
            offset=int(o["offset"]),
            key=None if o["key"] is None else bytes(o["key"]),
            value=bytes(o["value"]),
            error=str(o["error"]),
            at=int(o["at"]),
        )
    except Exception as exc:
        raise EnvelopeError(f"bad dead letter: {exc!r}") from None


class DeadLetters:
    """The producing side, one per worker process."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(
        self, tp: TopicPartition, offset: int, key: bytes | None, value: bytes, error: str
    ) -> None:
        """Returns once the broker acknowledged (acks=all); raises otherwise."""
        letter = DeadLetter(tp.topic, tp.partition, offset, key, value, error, _now_ms())
        await asyncio.wait_for(
            self.producer.send_and_wait(self.topic, encode(letter), key=key), SEND_TIMEOUT_S
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def preview(value: bytes, limit: int = 80) -> str:
    """A printable glimpse of a record's value (MessagePack when it decodes, else bytes)."""
    try:
        text = repr(msgpack.unpackb(value, raw=False))
    except Exception:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def read_all(settings: Settings, which: str) -> list[tuple[int, int, DeadLetter | None]]:
    """Every record of a dead-letter topic: (partition, offset, letter or None if unreadable)."""
    topic = dlq_topic(settings, which)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()  # refresh metadata once
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[int, int, DeadLetter | None]] = []
        remaining = {tp for tp in tps if end[tp] > await consumer.position(tp)}
        deadline = asyncio.get_running_loop().time() + 30
        while remaining and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset >= end[tp]:
                        continue
                    try:
                        letter: DeadLetter | None = decode(rec.value)
                    except EnvelopeError:
                        letter = None
                    out.append((tp.partition, rec.offset, letter))
            remaining = {tp for tp in remaining if await consumer.position(tp) < end[tp]}
        return sorted(out, key=lambda r: (r[0], r[1]))
    finally:
        await consumer.stop()


async def replay(
    settings: Settings, which: str, offsets: Iterable[int] | None
) -> list[tuple[int, int, str, int, int]]:
    """Produce the chosen dead letters (all when `offsets` is None) to their original topic.
    Returns (dlq partition, dlq offset, topic, new partition, new offset) per record."""
    from fanout.kafka import make_producer

    chosen = None if offsets is None else set(offsets)
    letters = [
        (p, o, d)
        for p, o, d in await read_all(settings, which)
        if d is not None and (chosen is None or o in chosen)
    ]
    producer = make_producer(settings)
    await producer.start()
    try:
        out: list[tuple[int, int, str, int, int]] = []
        for p, o, d in letters:
            meta: Any = await producer.send_and_wait(d.topic, d.value, key=d.key)
            out.append((p, o, d.topic, meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()
