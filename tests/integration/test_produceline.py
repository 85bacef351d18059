"""gateway/produceline.py against the real broker: records reach their key's partition (the
one aiokafka's producer picks) in the order they were handed over, concurrent ones share
requests, a connection lost mid-request hands every record to aiokafka in order, and so
does a broker that stops answering (a private one, stopped), after which no record of the
line overtakes one aiokafka still holds."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from core.settings import Settings
from devstack import services
from fanout.kafka import ensure_topics, make_producer, messages_topic
from gateway.produceline import DEGRADED_S, ProduceLine, make_produce_line
from tests.engines import free_port

pytestmark = pytest.mark.engines


class Fresh(NamedTuple):
    settings: Settings  # with a topic prefix of the test's own
    producer: AIOKafkaProducer
    topic: str  # its messages topic


@pytest.fixture
async def fresh(settings: Settings) -> AsyncIterator[Fresh]:
    fresh = settings.with_overrides(kafka_topic_prefix=f"pl{secrets.token_hex(3)}")
    await ensure_topics(fresh)
    producer = make_producer(fresh)
    await producer.start()
    try:
        yield Fresh(fresh, producer, messages_topic(fresh))
    finally:
        await producer.stop()


async def _read(settings: Settings, n: int) -> dict[int, list[tuple[bytes, bytes, int]]]:
    """At least `n` records of the messages topic: (key, value, offset) per partition, in
    order."""
    consumer = AIOKafkaConsumer(
        messages_topic(settings),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    got: dict[int, list[tuple[bytes, bytes, int]]] = defaultdict(list)
    try:
        async with asyncio.timeout(20):
            while sum(map(len, got.values())) < n:
                batches = await consumer.getmany(timeout_ms=200)
                for tp, records in batches.items():
                    got[tp.partition] += [(r.key or b"", r.value or b"", r.offset) for r in records]
    finally:
        await consumer.stop()
    return got


async def test_records_reach_their_keys_partition_in_order_and_share_requests(
    fresh: Fresh,
) -> None:
    settings, producer, topic = fresh
    line = make_produce_line(producer, topic)
    assert line is not None
    assert make_produce_line(producer, topic, enabled=False) is None  # keeps aiokafka
    keys = [str(770000000000000000 + 7919 * i).encode() for i in range(12)]
    # aiokafka's partition for each key, from its own producer: the line must agree, or a
    # conversation's records would be split between partitions (and reordered).
    expected = {}
    for key in keys:
        report = await producer.send_and_wait(topic, b"probe", key=key)
        expected[key] = report.partition
    assert len(set(expected.values())) > 1  # the keys do spread over partitions
    sent: list[tuple[bytes, bytes]] = []
    futures = []
    for i in range(300):  # all at once: queued behind the request in flight
        key = keys[i % len(keys)]
        value = f"m{i}".encode()
        fut = line.send(key, value)
        assert fut is not None
        futures.append(fut)
        sent.append((key, value))
    # What aiokafka's producer answers (RecordMetadata), each record's own.
    reports = await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert [m.partition for m in reports] == [expected[k] for k, _ in sent]
    assert {m.topic for m in reports} == {topic}
    assert all(m.topic_partition == (topic, m.partition) for m in reports)
    assert line.records == 300 and line.handed_over == 0
    assert 1 <= line.requests < 300 // 4  # batched without a timer: what waited went together
    got = await _read(settings, len(keys) + 300)
    for partition, records in got.items():
        ours = [r for r in records if r[1] != b"probe"]
        assert [(k, v) for k, v, _ in ours] == [r for r in sent if expected[r[0]] == partition]
    # Each report's offset is where the broker stored that record.
    stored = {(p, offset): value for p, records in got.items() for _, value, offset in records}
    assert [stored[m.partition, m.offset] for m in reports] == [v for _, v in sent]
    await line.close()


async def test_a_connection_lost_mid_request_hands_every_record_to_aiokafka_in_order(
    fresh: Fresh,
) -> None:
    settings, producer, topic = fresh
    line = ProduceLine(producer, topic)
    key = b"771234567890123456"
    first = line.send(key, b"warm")  # connects
    assert first is not None
    await asyncio.wait_for(first, 10)
    conn = next(iter(line._connections.values()))
    futures = []
    for i in range(40):
        fut = line.send(key, f"r{i}".encode())
        assert fut is not None
        futures.append(fut)
    assert conn.in_flight is not None and conn.queue  # one request out, the rest waiting
    assert conn.transport is not None
    conn.transport.abort()  # the connection breaks under the request in flight
    late = line.send(key, b"r40")  # before the loss is seen: queued, handed over too
    assert late is not None
    futures.append(late)
    for _ in range(100):  # connection_lost comes within a few loop iterations
        if not line.usable():
            break
        await asyncio.sleep(0)
    # From now on a record goes to aiokafka (None: the caller uses the producer), and
    # only once the failed ones are in its hands: behind them.
    assert not line.usable() and line.send(key, b"after") is None
    await asyncio.wait_for(line.settled(), 10)
    report = await producer.send(topic, b"after", key=key)
    reports = await asyncio.wait_for(asyncio.gather(*futures), 10)
    partition = (await asyncio.wait_for(report, 10)).partition
    assert {m.partition for m in reports} == {partition}  # aiokafka's own reports
    assert line.handed_over == 41  # every record not answered before the loss
    values = [v for _, v, _ in (await _read(settings, 43))[partition]]
    # Each record at least once (the request that broke may have been stored too), the
    # first copies in the order they were handed over, "after" last.
    order = [b"warm"] + [f"r{i}".encode() for i in range(41)] + [b"after"]
    assert list(dict.fromkeys(values)) == order
    await line.close()


async def _produce(line: ProduceLine, producer: AIOKafkaProducer, key: bytes, value: bytes) -> Any:
    """As the send path produces (gateway/send.py `_publish`): through the line, else
    behind the records it is handing over, through aiokafka, which the line is told of."""
    fut = line.send(key, value)
    if fut is not None:
        return fut
    await line.settled()
    report = await producer.send(line.topic, value, key=key)
    line.track(key, report)
    return report


async def test_a_broker_that_stops_answering_gets_every_record_in_order(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    broker = services.start_tansu("127.0.0.1", port, tmp_path / "tansu.log")
    try:
        own = settings.with_overrides(kafka_bootstrap=f"127.0.0.1:{port}")
        await ensure_topics(own)
        producer = make_producer(own)
        await producer.start()
        clock = [0.0]  # the line's degraded window, moved by hand
        line = ProduceLine(producer, messages_topic(own), timeout_s=1.0, now=lambda: clock[0])
        key = b"771234567890123456"
        first = line.send(key, b"warm")
        assert first is not None
        await asyncio.wait_for(first, 10)
        broker.send_signal(signal.SIGSTOP)  # hangs: its sockets stay open, nothing answers
        futures = [await _produce(line, producer, key, f"r{i}".encode()) for i in range(20)]
        # The line's request times out (timeout_s): its records are handed to aiokafka. On a
        # loaded machine the timeout may come before all 20 were sent; the rest then go to
        # aiokafka directly (`_produce`), behind the handed-over ones. Bounded: a hang fails.
        async with asyncio.timeout(10):
            while line.usable():
                await asyncio.sleep(0.05)
        await asyncio.wait_for(line.settled(), 10)
        assert line.handed_over > 0
        # Degraded: the next ones go to aiokafka, behind the handed-over records.
        futures.append(await _produce(line, producer, key, b"behind"))
        # The degraded window is over, but aiokafka holds every record above unacknowledged
        # (the broker is still stopped): one through the line now could reach the broker
        # before them on its own connection.
        clock[0] += DEGRADED_S + 1
        assert line.send(key, b"probe") is None
        futures.append(await _produce(line, producer, key, b"last"))
        broker.send_signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        # Every record acknowledged by aiokafka: the line takes records again.
        clock[0] += DEGRADED_S + 1
        again = line.send(key, b"line again")
        assert again is not None
        partition = (await asyncio.wait_for(again, 10)).partition
        values = [v for _, v, _ in (await _read(own, 24))[partition]]
        order = [b"warm", *(f"r{i}".encode() for i in range(20)), b"behind", b"last"]
        assert list(dict.fromkeys(values)) == [*order, b"line again"]
        await line.close()
        await producer.stop()
    finally:
        broker.send_signal(signal.SIGCONT)
        broker.kill()
        broker.wait()
