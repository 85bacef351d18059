"""What a worker's fetch wait (`AGORA_KAFKA_FETCH_WAIT_MS`) costs on Tansu: its CPU and a
record's produce-to-consume latency, per wait and rate, measured alone (issue 14, target 3).

A private Tansu pinned to --broker-core; this process (elsewhere) produces --rates
records/s (acks=all, one request per record: as the gateways' sends at low rates) to an
8-partition topic and consumes it as the fan-out worker does (a group member, its fetch
wait the one measured, `getmany` in a loop). Per phase of --seconds: the records'
produce-to-consume latency (the value carries its send time), the fetch requests sent
and those that brought records, Tansu's CPU from /proc. The waits alternate within each
round, so drift on a shared machine hits them alike.

    .venv/bin/python -m bench.fetchwait --waits 20,10,5 --rates 0,100,500 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.consumer.fetcher import Fetcher

from bench.common import pin_threads, proc_cpu_s
from devstack.services import start_tansu
from tests.engines import free_port

FETCHES = {"sent": 0, "with_records": 0}


def _count_fetches() -> None:
    """Count the consumer's fetch requests, and those that brought records."""
    original = Fetcher._proc_fetch_request

    async def counted(self: Any, *a: Any, **k: Any) -> Any:
        FETCHES["sent"] += 1
        got = await original(self, *a, **k)
        FETCHES["with_records"] += bool(got)
        return got

    Fetcher._proc_fetch_request = counted  # type: ignore[method-assign]


async def phase(
    bootstrap: str, topic: str, broker_pid: int, wait_ms: int, rate: float, seconds: float
) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"fw-{wait_ms}-{rate}-{time.monotonic_ns()}",
        enable_auto_commit=False,
        auto_offset_reset="latest",
        fetch_max_wait_ms=wait_ms,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    latencies: list[float] = []
    stop = asyncio.Event()

    async def consume() -> None:
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=200)
            now = time.time_ns()
            for recs in got.values():
                latencies.extend((now - int(r.value)) / 1e6 for r in recs)

    async def produce() -> None:
        if rate <= 0:
            await asyncio.sleep(seconds)
            return
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < seconds:
            while sent < int(elapsed * rate):
                # Not awaited: one request per record at these rates (linger 0).
                await producer.send(
                    topic, str(time.time_ns()).encode(), key=str(sent % 20).encode()
                )
                sent += 1
            await asyncio.sleep(0.001)

    try:
        reader = asyncio.create_task(consume())
        await asyncio.sleep(3.0)  # the group join and the first fetches
        latencies.clear()
        fetches0 = dict(FETCHES)
        cpu0 = proc_cpu_s(broker_pid)
        await produce()
        await asyncio.sleep(0.5)
        cpu = proc_cpu_s(broker_pid) - cpu0
        stop.set()
        await reader
    finally:
        await producer.stop()
        await consumer.stop()
    span = seconds + 0.5
    return {
        "wait_ms": wait_ms,
        "rate": rate,
        "records": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None,
        "p99_ms": (
            round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 2) if latencies else None
        ),
        "fetches_per_s": round((FETCHES["sent"] - fetches0["sent"]) / span, 1),
        "with_records_per_s": round((FETCHES["with_records"] - fetches0["with_records"]) / span, 1),
        "tansu_cores": round(cpu / span, 3),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="fetchwait-")) / "tansu.log"
    broker = start_tansu("127.0.0.1", port, log)
    try:
        pin_threads(broker.pid, {args.broker_core})
        bootstrap = f"127.0.0.1:{port}"
        out = []
        for rnd in range(args.rounds):
            for rate in (float(r) for r in args.rates.split(",")):
                for wait in (int(w) for w in args.waits.split(",")):
                    # A topic of its own per phase: Tansu's CPU grows with its log.
                    topic = f"fetchwait-{rnd}-{rate:g}-{wait}"
                    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
                    await admin.start()
                    await admin.create_topics([NewTopic(topic, 8, 1)])
                    await admin.close()
                    row = await phase(bootstrap, topic, broker.pid, wait, rate, args.seconds)
                    row["round"] = rnd + 1
                    print(row, flush=True)
                    out.append(row)
        return out
    finally:
        broker.kill()
        broker.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waits", default="20,10,5", help="fetch waits (ms), alternated")
    p.add_argument("--rates", default="0,100,500", help="records/s per phase")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--broker-core", type=int, default=0)
    args = p.parse_args()
    _count_fetches()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
