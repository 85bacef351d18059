"""What a Produce request costs the broker, apart from its records (issue 14: the broker's
CPU in the pinned scenario follows the number of requests).

A private Tansu pinned to --broker-core, this process on the other core producing through
the send path's produce line (gateway/produceline.py) --records records of --value-bytes
over 8 partitions at --rate records/s, k at a time (the k sends of one loop turn share a
request): k = 1, 2, 4, 8 over distinct keys (partitions), and 4 on one key (one partition
batch per request). The broker's CPU-seconds per variant from /proc; an idle phase first.
Variants alternate for --rounds rounds. The k records go as one request whatever the
line's own rule for when to write (`_one_request_per_turn`). Each variant on a topic of
its own (Tansu's CPU grows with its log).

The scenario's pattern (issue 14's floors): `--producers 2` lines sharing the rate (the two
gateways), `--ks` the records per request (0: each record sent at its own moment, not
awaited, so the line sends what arrived during its round trip), `--fetch-wait-ms` a
consumer as the fan-out worker (a group member, `getmany` in a loop, offsets committed ~10
times a second). Per variant also the acks' and the produce-to-consume latencies.

    flock /tmp/agora-bench.lock .venv/bin/python -m bench.producecost
    flock /tmp/agora-bench.lock .venv/bin/python -m bench.producecost --records 10000 \
        --rate 500 --producers 2 --fetch-wait-ms 20 --value-bytes 140 --ks 0,1,2,3,10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from bench.common import proc_cpu_s
from bench.fetchwait import FETCHES, _count_fetches
from core.settings import Settings
from devstack import services
from fanout.kafka import ensure_topics, make_producer, messages_topic
from gateway.produceline import ProduceLine, _Connection
from tests.engines import free_port

VARIANTS: tuple[tuple[str, int, bool], ...] = (
    ("k1", 1, False),
    ("k2", 2, False),
    ("k4", 4, False),
    ("k8", 8, False),
)
VARIANTS += (("k4, one partition", 4, True),)


def _one_request_per_turn() -> None:
    """A measurement aid: the records a connection is given in one loop turn, with no
    request in flight, go out as one request at the turn's end (the connection is held
    as if a request were in flight until then)."""
    add = _Connection.add
    hold = object()

    def held_add(self: Any, partition: int, record: Any) -> None:
        if self.transport is not None and self.in_flight is None:
            self.in_flight = hold

            def release() -> None:
                if self.in_flight is hold:
                    self.in_flight = None
                    self._flush()

            asyncio.get_running_loop().call_soon(release)
        add(self, partition, record)

    _Connection.add = held_add  # type: ignore[method-assign]


def _value(size: int) -> bytes:
    """`size` bytes that start with the send time (ns), for the consumer's latency."""
    return str(time.time_ns()).encode().ljust(size, b"x")


def _ack(acks: list[float], start: float, _f: object) -> None:
    acks.append((time.perf_counter() - start) * 1e3)


async def _produce(
    line: ProduceLine, keys: list[bytes], k: int, one_key: bool, rate: float, n: int, size: int
) -> list[float]:
    """n records at `rate`: k at a time, each k awaited (k = 0: one at a time at its due
    moment, not awaited, so the line sends what arrived during its round trip); the acks'
    latencies (ms)."""
    acks: list[float] = []
    pending: list[asyncio.Future[Any]] = []
    due = time.monotonic()
    sent = 0
    while sent < n:
        # k keys in turn from the list, a shorter batch at its end (so k = 2, 3, 10 over 25
        # keys make 1.92, 2.78, 8.33 records a request: reported as measured).
        batch = [keys[0]] * max(k, 1) if one_key else keys[sent % len(keys) :][: max(k, 1)]
        start = time.perf_counter()
        futures = [f for f in (line.send(key, _value(size)) for key in batch) if f is not None]
        sent += len(batch)
        if k:
            await asyncio.gather(*futures)
            acks.append((time.perf_counter() - start) * 1e3)
        else:
            for f in futures:
                f.add_done_callback(partial(_ack, acks, start))
            pending += futures
        due += len(batch) / rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    await asyncio.gather(*pending)
    return acks


async def _consume(consumer: Any, latencies: list[float], stop: asyncio.Event) -> None:
    """As the fan-out worker: `getmany` in a loop, offsets committed ~10 times a second."""
    committed = time.monotonic()
    while not stop.is_set():
        got = await consumer.getmany(timeout_ms=200)
        now = time.time_ns()
        for recs in got.values():
            latencies.extend((now - int(r.value[:19])) / 1e6 for r in recs)
        if got and time.monotonic() - committed >= 0.1:
            committed = time.monotonic()
            await consumer.commit()


async def phase(
    args: argparse.Namespace, port: int, tansu_pid: int, tag: str, k: int, one_key: bool
) -> dict[str, Any]:
    """One variant on a topic of its own (Tansu's CPU grows with its log): --producers
    lines sharing --rate, and the worker-like consumer when --fetch-wait-ms is set."""
    settings = Settings.from_env(
        {
            "AGORA_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "AGORA_KAFKA_TOPIC_PREFIX": f"pc{tag}",
            "AGORA_KAFKA_PARTITIONS": "8",
            "AGORA_KAFKA_IDEMPOTENCE": "false",
            "AGORA_SHARD_DSNS": "postgresql://unused/unused",
            "AGORA_JWT_SECRET": secrets.token_hex(16),
        }
    )
    await ensure_topics(settings)
    topic = messages_topic(settings)
    producers = [make_producer(settings) for _ in range(args.producers)]
    lines = []
    for producer in producers:
        await producer.start()
        lines.append(ProduceLine(producer, topic))
    keys = [str(780000000000000000 + 7919 * i).encode() for i in range(50)]
    for line in lines:
        warm = line.send(keys[0], _value(args.value_bytes))
        assert warm is not None
        await asyncio.wait_for(warm, 10)
    consumer = None
    latencies: list[float] = []
    stop = asyncio.Event()
    reader = None
    if args.fetch_wait_ms:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=f"127.0.0.1:{port}",
            group_id=f"pc{tag}",
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=args.fetch_wait_ms,
        )
        await consumer.start()
        reader = asyncio.create_task(_consume(consumer, latencies, stop))
        await asyncio.sleep(3.0)  # the group join and the first fetches
    await asyncio.sleep(0.5)
    latencies.clear()
    cpu0, fetches0 = proc_cpu_s(tansu_pid), dict(FETCHES)
    requests0 = sum(line.requests for line in lines)
    n = args.records // args.producers
    if k < 0:  # the idle phase
        acks: list[float] = []
        await asyncio.sleep(args.records / args.rate)
    else:
        per_line = [
            _produce(line, keys[i::2], k, one_key, args.rate / len(lines), n, args.value_bytes)
            for i, line in enumerate(lines)
        ]
        acks = [a for got in await asyncio.gather(*per_line) for a in got]
    await asyncio.sleep(0.5)
    cpu = proc_cpu_s(tansu_pid) - cpu0
    requests = sum(line.requests for line in lines) - requests0
    stop.set()
    if reader is not None and consumer is not None:
        await reader
        await consumer.stop()
    for line, producer in zip(lines, producers, strict=True):
        await line.close()
        await producer.stop()
    acks.sort()
    latencies.sort()
    records = n * len(lines) if k >= 0 else 0
    return {
        "requests": requests,
        "records_per_request": round(records / requests, 2) if requests else None,
        "fetches": FETCHES["sent"] - fetches0["sent"],
        "broker_cpu_s": round(cpu, 3),
        "us_per_record": round(cpu / records * 1e6) if records else None,
        "ack_p50_ms": round(statistics.median(acks), 2) if acks else None,
        "ack_p99_ms": round(acks[int(0.99 * (len(acks) - 1))], 2) if acks else None,
        "consumed": len(latencies),
        "consume_p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "consume_p99_ms": (
            round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None
        ),
    }


async def measure(args: argparse.Namespace) -> None:
    _one_request_per_turn()
    _count_fetches()
    port = free_port()
    tansu = services.start_tansu("127.0.0.1", port, Path(".agora/bench/logs/producecost.log"))
    for tid in os.listdir(f"/proc/{tansu.pid}/task"):
        os.sched_setaffinity(int(tid), {args.broker_core})
    others = set(os.sched_getaffinity(0)) - {args.broker_core}
    if others:
        os.sched_setaffinity(0, others)
    variants = [("idle", -1, False)]
    if args.ks:
        variants += [(f"k{k}" if k else "line", k, False) for k in map(int, args.ks.split(","))]
    else:
        variants += list(VARIANTS)
    try:
        for rnd in range(args.rounds):
            for i, (name, k, one_key) in enumerate(variants):
                row = await phase(args, port, tansu.pid, f"{rnd}x{i}", k, one_key)
                print(f"round {rnd} {name}: {row}", flush=True)
    finally:
        tansu.kill()
        tansu.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--rate", type=float, default=250.0)
    p.add_argument("--value-bytes", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--broker-core", type=int, default=0)
    p.add_argument("--producers", type=int, default=1, help="lines (connections) sharing --rate")
    p.add_argument(
        "--ks", default="", help="records per request, e.g. 1,2,3 (0: as they arrive); else k1-k8"
    )
    p.add_argument(
        "--fetch-wait-ms", type=int, default=0, help="a worker-like consumer with this wait"
    )
    asyncio.run(measure(p.parse_args(argv)))


if __name__ == "__main__":
    main()
