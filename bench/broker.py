"""The broker alone: does it bound its log, and what does its CPU do as the log grows?

A private broker (Tansu, as the tests and the other benches start it) gets a topic created
with retention.ms, retention.bytes, segment.ms and segment.bytes; a producer (acks=all,
idempotence off, keyed over 20 keys: as the gateways produce) writes --rate records/s for
--seconds; a consumer group member (as the fan-out worker consumes) joins at
--consume-from s. Per --interval: records produced and consumed, the broker's CPU seconds
and RSS, its log (end minus start offsets), produce-to-consume latency. At the end: were
the retention configs accepted (DescribeConfigs) and applied (did any start offset move),
and what did DeleteRecords below the committed offsets do, and did the broker survive it.

    .venv/bin/python -m bench.broker --seconds 240 --consume-from 120
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.admin.records_to_delete import RecordsToDelete

from bench.common import (
    RESULTS_DIR,
    RESULTS_MD,
    command_line,
    conditions,
    machine,
    machine_line,
    md_table,
    percentiles,
    proc_cpu_s,
    proc_rss_kib,
    slope,
    write_results,
)
from bench.stack import LOG_DIR
from devstack.services import start_tansu
from tests.engines import free_port

NAME = "broker"
TOPIC = "probe"
PARTITIONS = 8
RETENTION = {
    "retention.ms": "5000",
    "retention.bytes": "10000",
    "segment.ms": "1000",
    "segment.bytes": "14000",
}


async def _consume(
    consumer: AIOKafkaConsumer,
    delay: float,
    started: list[float],
    latencies: list[float],
    got: list[int],
) -> None:
    """Join after `delay` s (production goes on meanwhile), then consume and commit."""
    await asyncio.sleep(delay)
    await consumer.start()
    started.append(time.monotonic())
    while True:
        batch = await consumer.getmany(timeout_ms=200)
        now = time.time()
        for records in batch.values():
            for r in records:
                if r.value is not None:
                    latencies.append((now - float(r.value.decode())) * 1000)
                got[0] += 1
        if batch:
            await consumer.commit()


async def _log(consumer: AIOKafkaConsumer) -> tuple[int, int]:
    """(records held, sum of the partitions' start offsets)."""
    tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    end = await consumer.end_offsets(tps)
    begin = await consumer.beginning_offsets(tps)
    return sum(end[tp] - begin[tp] for tp in tps), sum(begin.values())


async def measure(args: argparse.Namespace, bootstrap: str, pid: int) -> dict[str, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1, topic_configs=RETENTION)])
    described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, TOPIC)])
    stored_configs = {
        entry[0]: entry[1]
        for response in described
        for resource in response.resources
        for entry in resource[4]
        if entry[0] in RETENTION
    }
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=1
    )
    await producer.start()
    group = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id="probe",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,  # as the dev stack's AGORA_KAFKA_FETCH_WAIT_MS
    )
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap)  # offsets only, no group
    await reader.start()
    latencies: list[float] = []
    got = [0]
    started: list[float] = []
    rows: list[dict[str, Any]] = []
    sent = 0
    t0 = time.monotonic()
    consumer_task = asyncio.get_running_loop().create_task(
        _consume(group, args.consume_from, started, latencies, got)
    )
    cpu_prev = proc_cpu_s(pid)
    next_row = t0 + args.interval
    pending: list[asyncio.Future[Any]] = []
    try:
        while True:
            now = time.monotonic()
            if now >= next_row:
                cpu = proc_cpu_s(pid)
                held, starts = await _log(reader)
                lat = percentiles(latencies)
                latencies.clear()
                rows.append(
                    {
                        "second": round(now - t0),
                        "produced": sent,
                        "consumed": got[0],
                        # The consumer was there for the whole interval.
                        "consumer": bool(started) and started[0] <= next_row - args.interval,
                        "broker_cpu_s": round(cpu - cpu_prev, 2),
                        "broker_rss_mib": round(proc_rss_kib(pid) / 1024, 1),
                        "log_records": held,
                        "log_start_offsets": starts,
                        "p50_ms": lat["p50"],
                        "p99_ms": lat["p99"],
                    }
                )
                print(f"  {rows[-1]}", flush=True)
                cpu_prev = cpu
                next_row += args.interval
                if now - t0 >= args.seconds:
                    break
            due = int((now - t0) * args.rate)
            while sent < due and now - t0 < args.seconds:
                pending.append(
                    await producer.send(
                        TOPIC, str(time.time()).encode(), key=str(sent % 20).encode()
                    )
                )
                sent += 1
            pending = [f for f in pending if not f.done()]
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)
        deleted = await _delete_records(admin, group, pid) if started else {}
        held, starts = await _log(reader)
    finally:
        consumer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer_task
        await group.stop()
        await reader.stop()
        await producer.stop()
        await admin.close()
    return {
        "configs_returned": stored_configs,
        "configs_applied": starts > 0,
        "log_start_offsets_at_end": starts,
        "log_records_at_end": held,
        "delete_records": deleted,
        "rows": rows,
    }


async def _delete_records(
    admin: AIOKafkaAdminClient, group: AIOKafkaConsumer, pid: int
) -> dict[str, Any]:
    """DeleteRecords below the group's committed offsets: what came back, and whether
    the broker process is still there afterwards."""
    tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    committed = {tp: await group.committed(tp) for tp in tps}
    request = {tp: RecordsToDelete(before_offset=o) for tp, o in committed.items() if o}
    out: dict[str, Any] = {"requested_partitions": len(request)}
    try:
        answer = await admin.delete_records(request, timeout_ms=5000)
        out["answer"] = {str(tp.partition): low for tp, low in answer.items()}
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    await asyncio.sleep(1.0)
    out["broker_alive_after"] = _alive(pid)
    return out


def cpu_slopes(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Broker CPU-s per interval per 1,000 records held: over the intervals before any
    consumer (nothing consumed yet), and over those with the consumer there throughout
    (the interval it joined in, with its catch-up, is in neither)."""

    def fit(part: list[dict[str, Any]]) -> float:
        xs = [r["log_records"] / 1000 for r in part]
        return round(slope(xs, [r["broker_cpu_s"] for r in part]), 3)

    return {
        "cpu_per_1000_records_without_consumer": fit([r for r in rows if r["consumed"] == 0]),
        "cpu_per_1000_records_with_consumer": fit([r for r in rows if r["consumer"]]),
    }


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    broker = start_tansu("127.0.0.1", port, LOG_DIR / f"broker-probe-{port}.log")
    try:
        cond = conditions()
        found = asyncio.run(measure(args, f"127.0.0.1:{port}", broker.pid))
    finally:
        broker.kill()
        broker.wait()
    rows = found["rows"]
    summary = {
        "configs_returned": found["configs_returned"],
        "retention_applied": found["configs_applied"],
        "delete_records": found["delete_records"],
        **cpu_slopes(rows),
        "log_records_at_end": found["log_records_at_end"],
    }
    return {
        "bench": NAME,
        "command": command_line(),
        "machine": machine(),
        "conditions": cond,
        "conditions_end": conditions(),
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "results_md")},
        "summary": summary,
        "rows": rows,
        "targets": {
            "bounded": {
                "target": "the broker bounds its log (retention applied or DeleteRecords "
                "honoured) and its CPU per interval stays flat at a steady rate",
                "reached": bool(found["configs_applied"] or found["delete_records"].get("answer")),
            }
        },
    }


def render(data: dict[str, Any]) -> str:
    s = data["summary"]
    p = data["params"]
    rows = [
        [
            r["second"],
            "yes" if r["consumer"] else "no",
            r["produced"],
            r["consumed"],
            r["log_records"],
            r["log_start_offsets"],
            r["broker_cpu_s"],
            r["broker_rss_mib"],
            r["p50_ms"] if r["consumed"] else "-",
            r["p99_ms"] if r["consumed"] else "-",
        ]
        for r in data["rows"]
    ]
    headers = ["s", "consumer", "produced", "consumed", "log records", "start offsets"]
    headers += [f"broker CPU s / {p['interval']:g} s", "broker RSS MiB", "p50 ms", "p99 ms"]
    return "\n".join(
        [
            "### The dev broker alone (`bench.broker`)",
            "",
            f"`{data['command']}`",
            "",
            machine_line(data["machine"], data["conditions"]),
            "",
            f"{p['rate']:g} records/s keyed over 20 keys into {PARTITIONS} partitions; a "
            f"consumer group member from second {p['consume_from']:g}. Topic configs "
            f"{RETENTION} returned by DescribeConfigs: {s['configs_returned'] or 'none'}; "
            f"applied (any start offset moved): **{s['retention_applied']}**. DeleteRecords "
            f"below the committed offsets: {s['delete_records'] or 'not tried'}.",
            "",
            md_table(headers, rows),
            "",
            f"Broker CPU-s per interval per 1,000 records held: "
            f"{s['cpu_per_1000_records_without_consumer']} without a consumer, "
            f"**{s['cpu_per_1000_records_with_consumer']}** with one.",
            "",
            f"- {data['targets']['bounded']['target']}: "
            + ("**reached**" if data["targets"]["bounded"]["reached"] else "**not reached**"),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--rate", type=float, default=200.0, help="records/s")
    p.add_argument("--interval", type=float, default=30.0, help="seconds per row")
    p.add_argument("--consume-from", type=float, default=120.0, help="second the consumer joins")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--results-md", default=str(RESULTS_MD))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = run(args)
    md = Path(args.results_md) if args.results_md else None
    path = write_results(NAME, data, render(data), Path(args.out), md)
    s = data["summary"]
    print(
        f"{NAME}: retention applied {s['retention_applied']}, DeleteRecords "
        f"{s['delete_records']}, CPU per 1,000 records {s['cpu_per_1000_records_with_consumer']}"
        f" -> {path}"
    )
    return data


if __name__ == "__main__":
    main()
