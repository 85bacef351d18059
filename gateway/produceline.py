"""A lean produce path for the send path's records (issue 14: the gateways' CPU per send).

Through aiokafka a lone record costs the gateway ~0.5 ms of CPU from `send()` to its
acknowledgement (bench/RESULTS.md, "The produce path"): the accumulator, the sender task
and a task per request, `asyncio.wait` over every waiter on each wake, stream reader
tasks, `wait_for` per request and the protocol structs in Python. Here a Produce request
(v3, acks=all) goes straight onto one connection per broker, built with aiokafka's C
record-batch builder, and its answer is parsed in `data_received`: the same bytes on the
wire, a fraction of the Python.

What it keeps from aiokafka's producer: the records of a partition reach the broker in
the order `send` was called (one request in flight per connection; what arrives meanwhile
goes out together in the next request, one batch per partition, in order: no timer), the
partition is aiokafka's default one for the key (murmur2, as every other producer of the
topic), the metadata (leaders, brokers) is the producer's, and nothing is acknowledged
before the broker answered acks=all.

What it leaves to aiokafka: anything that is not a plain, successful round trip. When a
request fails (an error code, a lost connection, no answer in time), its records and those
queued behind it are handed to the aiokafka producer, in order, which retries them as
before; until that hand-over is done and for `DEGRADED_S` after, every record goes through
aiokafka (`usable()` is False), and after it a partition's records keep going through
aiokafka while it still holds one of that partition unacknowledged (the records handed
over, and those the caller gave it meanwhile and told the line of with `track`): the line's
own connection would otherwise reach the broker before aiokafka's retries (a broker that
stopped answering for longer than `DEGRADED_S` does that). So no record overtakes an
earlier one of its partition. A
record handed over may reach the broker twice (the failed request may have been appended):
the same message, stored once under its (conversation, sender, cid) key, as with any
producer retry without idempotence.

Its records carry no producer id, whatever the producer's `enable_idempotence`: the send
path does not rely on the broker's idempotence (the (conversation, sender, cid) unique key
stores one copy), and a broker keeps sequence numbers per producer id, so the line's records
and those an idempotent producer retries after a hand-over share a partition without
conflict. Not for TLS/SASL, which the line does not speak, nor where an operator turned it
off (AGORA_KAFKA_PRODUCE_LINE=false): there the send path keeps aiokafka
(`make_produce_line` returns None).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, for_code
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import RecordMetadata, TopicPartition

log = logging.getLogger(__name__)

PRODUCE_API_KEY = 0
PRODUCE_VERSION = 3  # record batches (magic 2), the oldest version Kafka 4 still accepts
ACKS_ALL = -1
DEGRADED_S = 5.0  # after a failure, records go through aiokafka this long
MAX_BATCH_BYTES = 512 * 1024  # under a broker's default max.message.bytes (1 MB)
MAX_RECORD_BYTES = MAX_BATCH_BYTES // 4  # larger ones go through aiokafka
_KEY_CACHE_MAX = 100_000

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_HEADER = struct.Struct(">ihhi")  # size, api key, api version, correlation id
_PARTITION_ANSWER = struct.Struct(">ihqq")  # partition, error code, base offset, append time

# key, value, and what aiokafka's producer answers once the broker acked it
Record = tuple[bytes, bytes, "asyncio.Future[RecordMetadata]"]


def _string(s: str) -> bytes:
    raw = s.encode()
    return _I16.pack(len(raw)) + raw


class _Request:
    """One Produce request in flight: its records per partition, in order, and their
    timestamp (CreateTime, ms)."""

    __slots__ = ("batches", "correlation", "timer", "timestamp")

    def __init__(self, correlation: int, batches: dict[int, list[Record]], timestamp: int) -> None:
        self.correlation = correlation
        self.batches = batches
        self.timestamp = timestamp
        self.timer: asyncio.TimerHandle | None = None

    def records(self) -> list[Record]:
        return [r for records in self.batches.values() for r in records]


class _Connection(asyncio.Protocol):
    """The line's connection to one broker: one request in flight, the rest queued."""

    def __init__(self, line: ProduceLine, node: int) -> None:
        self.line = line
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.connecting = False
        self.closed = False
        self.queue: dict[int, list[Record]] = {}  # partition -> records, in call order
        self.in_flight: _Request | None = None
        self._buffer = bytearray()
        self._correlation = 0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connecting = False
        if self.closed:  # given up while connecting (the line closed)
            transport.close()
            return
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.closed:
            return  # given up already (its records handed over)
        self._fail(KafkaConnectionError(f"connection to broker {self.node} lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            (size,) = _I32.unpack_from(buffer)
            if len(buffer) < 4 + size:
                return
            frame = bytes(buffer[4 : 4 + size])
            del buffer[: 4 + size]
            try:
                self._answered(frame)
            except Exception as exc:  # a malformed answer: give the connection up
                self._fail(KafkaError(f"unreadable produce response: {exc!r}"))
                return

    # -- the line's side --------------------------------------------------------------------
    def add(self, partition: int, record: Record) -> None:
        self.queue.setdefault(partition, []).append(record)
        if self.transport is not None:
            if self.in_flight is None:
                self._flush()
        elif not self.connecting:
            self.connecting = True
            task = asyncio.ensure_future(self._connect())
            self.line._tasks.add(task)
            task.add_done_callback(self.line._tasks.discard)

    async def _connect(self) -> None:
        broker = self.line.producer.client.cluster.broker_metadata(self.node)
        try:
            if broker is None:
                raise KafkaConnectionError(f"broker {self.node} unknown")
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.line.timeout_s):
                await loop.create_connection(lambda: self, broker.host, broker.port)
        except (OSError, TimeoutError, KafkaError) as exc:
            self.connecting = False
            self._fail(KafkaConnectionError(f"broker {self.node}: {exc!r}"))

    def _flush(self) -> None:
        """Send what is queued as one request (one batch per partition)."""
        if not self.queue or self.transport is None or self.in_flight is not None:
            return
        batches, self.queue = self.queue, {}
        self._correlation = (self._correlation + 1) & 0x7FFFFFFF
        # One timestamp for the request's records (the builder would read the clock for
        # each): what their RecordMetadata says unless the topic uses LogAppendTime.
        request = _Request(self._correlation, batches, int(time.time() * 1000))
        line = self.line
        parts = [_I32.pack(len(batches))]
        for partition, records in batches.items():
            # No producer id, epoch or sequence (-1): not idempotent.
            builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, MAX_BATCH_BYTES)
            for offset, (key, value, _) in enumerate(records):
                # The first record always fits (`send` takes no larger ones); when the
                # batch is full the rest go first in the next request.
                added = builder.append(offset, request.timestamp, key=key, value=value, headers=[])
                if added is None:
                    self.queue[partition] = records[offset:]
                    del records[offset:]
                    break
            data = bytes(builder.build())
            parts.append(_I32.pack(partition) + _I32.pack(len(data)) + data)
        body = line.body_prefix + b"".join(parts)
        header = _HEADER.pack(
            len(body) + 8 + len(line.client_id),
            PRODUCE_API_KEY,
            PRODUCE_VERSION,
            request.correlation,
        )
        self.in_flight = request
        request.timer = asyncio.get_running_loop().call_later(
            line.timeout_s, self._timed_out, request
        )
        line.requests += 1
        self.transport.write(header + line.client_id + body)

    def _timed_out(self, request: _Request) -> None:
        if self.in_flight is request:
            request.timer = None
            self._fail(KafkaTimeoutError(f"no produce response from broker {self.node} in time"))

    def _answered(self, frame: bytes) -> None:
        (correlation,) = _I32.unpack_from(frame)
        request = self.in_flight
        if request is None or correlation != request.correlation:
            raise ValueError(f"answer {correlation} to no request in flight")
        self.in_flight = None
        if request.timer is not None:
            request.timer.cancel()
        failed: list[Record] = []
        error: Exception | None = None
        answered: set[int] = set()
        pos = 4
        (topics,) = _I32.unpack_from(frame, pos)
        pos += 4
        for _ in range(topics):
            (n,) = _I16.unpack_from(frame, pos)
            pos += 2 + n
            (partitions,) = _I32.unpack_from(frame, pos)
            pos += 4
            for _ in range(partitions):
                partition, code, base, appended = _PARTITION_ANSWER.unpack_from(frame, pos)
                pos += _PARTITION_ANSWER.size
                records = request.batches.get(partition)
                if records is None:
                    continue
                answered.add(partition)
                if code == 0:
                    _acked(self.line.topic, partition, base, appended, request, records)
                else:
                    error = for_code(code)()
                    failed.extend(records)
        for partition, records in request.batches.items():
            if partition not in answered:  # not in the answer: not known to be stored
                error = error or KafkaError(f"no answer for partition {partition}")
                failed.extend(records)
        if failed:
            self._fail(error or KafkaError("produce failed"), failed)
        else:
            self._flush()

    def _fail(self, exc: Exception, failed: list[Record] | None = None) -> None:
        """Hand the failed records, then every one queued or in flight, to aiokafka."""
        records = list(failed or [])
        request, self.in_flight = self.in_flight, None
        if request is not None:
            if request.timer is not None:
                request.timer.cancel()
            records.extend(request.records())
        for queued in self.queue.values():
            records.extend(queued)
        self.queue = {}
        if self.line._connections.get(self.node) is self:
            del self.line._connections[self.node]
        self.closed = True
        if self.transport is not None:
            transport, self.transport = self.transport, None
            transport.close()
        self.line._hand_over(records, exc)


class ProduceLine:
    """The send path's records to `topic`, produced as described above."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        timeout_s: float = 5.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.timeout_s = timeout_s
        self._now = now
        self.client_id = _string("agora-produce-line")  # with its length
        # Everything of a request's body before its partitions: no transactional id,
        # acks=all, the broker's own timeout, one topic.
        self.body_prefix = (
            _I16.pack(-1)
            + _I16.pack(ACKS_ALL)
            + _I32.pack(int(timeout_s * 1000))
            + _I32.pack(1)
            + _string(topic)
        )
        self._connections: dict[int, _Connection] = {}
        self._hashes: dict[bytes, int] = {}
        self._degraded_until = 0.0
        self._handing_over: asyncio.Future[None] | None = None
        self._held: dict[int, int] = {}  # partition -> records aiokafka holds unacknowledged
        self._tasks: set[asyncio.Future[Any]] = set()
        self.requests = 0  # Produce requests this line sent (records / requests = batch size)
        self.records = 0
        self.handed_over = 0  # records handed to aiokafka after a failure

    def usable(self) -> bool:
        """False while records must go through aiokafka (after a failure)."""
        return self._handing_over is None and self._now() >= self._degraded_until

    async def settled(self) -> None:
        """Until the records of a failed request are in aiokafka's hands (in order): a
        record given to aiokafka after this goes behind them."""
        while self._handing_over is not None:
            await asyncio.wait((self._handing_over,))

    def partition(self, key: bytes) -> int | None:
        """aiokafka's default partition for `key` (None: the topic's metadata is unknown)."""
        partitions: set[int] | None = self.producer.client.cluster.partitions_for_topic(self.topic)
        if not partitions:
            return None
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= _KEY_CACHE_MAX:
                self._hashes.clear()
            h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        chosen: int = sorted(partitions)[h % len(partitions)]
        return chosen

    def send(self, key: bytes, value: bytes) -> asyncio.Future[RecordMetadata] | None:
        """Queue the record (in call order); a future of its RecordMetadata (what
        `AIOKafkaProducer.send` answers) once the broker acknowledged it with acks=all.
        None when it must go through aiokafka instead
        (`usable()` is False, or the partition's leader is not known)."""
        if not self.usable() or len(key) + len(value) > MAX_RECORD_BYTES:
            return None
        partition = self.partition(key)
        if partition is None or partition in self._held:
            return None  # unknown, or behind records aiokafka has not got acknowledged yet
        leader = self.producer.client.cluster.leader_for_partition(
            TopicPartition(self.topic, partition)
        )
        if leader is None or leader < 0:
            return None
        conn = self._connections.get(leader)
        if conn is None:
            conn = self._connections[leader] = _Connection(self, leader)
        fut: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        self.records += 1
        conn.add(partition, (key, value, fut))
        return fut

    def track(self, key: bytes, report: asyncio.Future[Any]) -> None:
        """A record of `key` the caller gave aiokafka (`send` returned None): until its
        delivery `report` is done, the line takes no record of its partition."""
        partition = self.partition(key)
        if partition is not None and not report.done():
            self._hold(partition, report)

    def _hold(self, partition: int, report: asyncio.Future[Any]) -> None:
        self._held[partition] = self._held.get(partition, 0) + 1

        def release(_: asyncio.Future[Any]) -> None:
            left = self._held[partition] - 1
            if left:
                self._held[partition] = left
            else:
                del self._held[partition]

        report.add_done_callback(release)

    def _hand_over(self, records: list[Record], exc: Exception) -> None:
        self._degraded_until = self._now() + DEGRADED_S
        if not records:
            return
        log.warning("produce line: %d records handed to the producer after %s", len(records), exc)
        self.handed_over += len(records)
        done = asyncio.get_running_loop().create_future()
        previous = self._handing_over
        self._handing_over = done
        task = asyncio.ensure_future(self._produce_through_aiokafka(records, previous, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _produce_through_aiokafka(
        self,
        records: list[Record],
        previous: asyncio.Future[None] | None,
        done: asyncio.Future[None],
    ) -> None:
        try:
            if previous is not None:
                await asyncio.wait((previous,))
            for key, value, fut in records:
                if fut.done():
                    continue
                try:
                    report = await self.producer.send(self.topic, value, key=key)
                except Exception as exc:
                    fut.set_exception(exc)
                    continue
                report.add_done_callback(lambda r, fut=fut: _copy(r, fut))
                self.track(key, report)
        finally:
            done.set_result(None)
            if self._handing_over is done:
                self._handing_over = None

    async def close(self, wait_s: float = 2.0) -> None:
        """Let the requests in flight and queued be answered (at most `wait_s`), then close;
        whatever is left is handed to the producer, which the caller stops after this."""
        self._degraded_until = float("inf")  # from now on every record goes to aiokafka
        pending = [
            fut
            for c in self._connections.values()
            for records in (
                *c.queue.values(),
                *(c.in_flight.batches.values() if c.in_flight is not None else ()),
            )
            for _, _, fut in records
        ]
        if pending:
            await asyncio.wait(pending, timeout=wait_s)
        for conn in list(self._connections.values()):
            conn._fail(KafkaConnectionError("produce line closed"))
        while self._tasks:
            await asyncio.wait(tuple(self._tasks))


def _acked(
    topic: str, partition: int, base: int, appended: int, request: _Request, records: list[Record]
) -> None:
    """Answer a partition's records as aiokafka's producer would (`MessageBatch.done`):
    each its RecordMetadata, offset from the batch's base, the broker's append time if
    the topic keeps one (type 1), else the records' own (type 0). Produce v3 answers no
    log start offset."""
    tp = TopicPartition(topic, partition)
    if appended == -1:
        timestamp, kind = request.timestamp, 0
    else:
        timestamp, kind = appended, 1
    for i, (_, _, fut) in enumerate(records):
        if not fut.done():
            fut.set_result(RecordMetadata(topic, partition, tp, base + i, timestamp, kind, None))


def _copy(report: asyncio.Future[Any], fut: asyncio.Future[RecordMetadata]) -> None:
    """aiokafka's delivery report into the line's future."""
    if fut.done():
        return
    if report.cancelled():
        fut.set_exception(KafkaError("produce cancelled"))
    elif report.exception() is not None:
        fut.set_exception(report.exception())  # type: ignore[arg-type]
    else:
        fut.set_result(report.result())


def make_produce_line(
    producer: AIOKafkaProducer, topic: str, enabled: bool = True
) -> ProduceLine | None:
    """The line for `topic`, or None where the send path keeps aiokafka (turned off by
    AGORA_KAFKA_PRODUCE_LINE; TLS or SASL, which the line does not speak)."""
    if not enabled:
        return None
    protocol = getattr(producer.client, "_security_protocol", "PLAINTEXT")
    if protocol != "PLAINTEXT":
        return None
    return ProduceLine(producer, topic)
