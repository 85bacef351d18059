"""What a Produce request costs the broker, apart from its records (issue 14: the broker's
CPU in the pinned scenario follows the number of requests).

A private Tansu pinned to --broker-core, this process on the other core producing through
the send path's produce line (gateway/produceline.py) --records records of --value-bytes
over 8 partitions at --rate records/s, k at a time (the k sends of one loop turn share a
request): k = 1, 2, 4, 8 over distinct keys (partitions), and 4 on one key (one partition
batch per request). The broker's CPU-seconds per variant from /proc; an idle phase first.
Variants alternate for --rounds rounds. The k records go as one request whatever the
line's own rule for when to write (`_one_request_per_turn`).

    flock /tmp/agora-bench.lock .venv/bin/python -m bench.producecost
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any

from bench.common import proc_cpu_s
from core.settings import Settings
from devstack import services
from fanout.kafka import ensure_topics, make_producer, messages_topic
from gateway.produceline import ProduceLine, _Connection
from tests.engines import free_port

VARIANTS = (("k1", 1, False), ("k2", 2, False), ("k4", 4, False), ("k8", 8, False))
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


async def measure(args: argparse.Namespace) -> None:
    _one_request_per_turn()
    port = free_port()
    tansu = services.start_tansu("127.0.0.1", port, Path(".agora/bench/logs/producecost.log"))
    for tid in os.listdir(f"/proc/{tansu.pid}/task"):
        os.sched_setaffinity(int(tid), {args.broker_core})
    others = set(os.sched_getaffinity(0)) - {args.broker_core}
    if others:
        os.sched_setaffinity(0, others)
    try:
        settings = Settings.from_env(
            {
                "AGORA_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
                "AGORA_KAFKA_TOPIC_PREFIX": "pc",
                "AGORA_KAFKA_PARTITIONS": "8",
                "AGORA_KAFKA_IDEMPOTENCE": "false",
                "AGORA_SHARD_DSNS": "postgresql://unused/unused",
                "AGORA_JWT_SECRET": secrets.token_hex(16),
            }
        )
        await ensure_topics(settings)
        producer = make_producer(settings)
        await producer.start()
        line = ProduceLine(producer, messages_topic(settings))
        keys = [str(780000000000000000 + 7919 * i).encode() for i in range(50)]
        value = b"x" * args.value_bytes
        warm = line.send(keys[0], value)
        assert warm is not None
        await asyncio.wait_for(warm, 10)
        seconds = args.records / args.rate
        next_key = 0
        for rnd in range(args.rounds):
            await asyncio.sleep(0.5)
            cpu0 = proc_cpu_s(tansu.pid)
            await asyncio.sleep(seconds)
            print(f"round {rnd} idle: broker {proc_cpu_s(tansu.pid) - cpu0:.3f} CPU-s", flush=True)
            for name, k, one_key in VARIANTS:
                await asyncio.sleep(0.5)
                cpu0, requests0 = proc_cpu_s(tansu.pid), line.requests
                due = time.monotonic()
                for _ in range(args.records // k):
                    if one_key:
                        batch = [keys[0]] * k
                    else:
                        batch = [keys[(next_key + j) % len(keys)] for j in range(k)]
                        next_key += k
                    futures = [line.send(key, value) for key in batch]
                    await asyncio.gather(*(f for f in futures if f is not None))
                    due += k / args.rate
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                cpu = proc_cpu_s(tansu.pid) - cpu0
                requests = line.requests - requests0
                print(
                    f"round {rnd} {name}: {requests} requests, {args.records} records, "
                    f"broker {cpu:.3f} CPU-s, {cpu / requests * 1e6:.0f} us per request, "
                    f"{cpu / args.records * 1e6:.0f} us per record",
                    flush=True,
                )
        await line.close()
        await producer.stop()
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
    asyncio.run(measure(p.parse_args(argv)))


if __name__ == "__main__":
    main()
