"""What the processes of a benchmark use, read while it runs: RSS (or PSS) and CPU of each
process by PID from /proc, Redis's used_memory and the run's key count, the records a
broker holds, and the CPU of the whole machine (to tell our load from the neighbours')."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.common import (
    child_pids,
    parent_pid,
    proc_cpu_s,
    proc_pss_kib,
    proc_rss_kib,
    proc_sched_s,
)
from bench.stack import BenchStack
from core.settings import Settings
from fanout.kafka import messages_topic
from storage import messages
from storage.pools import ShardPools

_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    # user nice system idle iowait irq softirq steal: everything but idle and iowait.
    busy = sum(int(parts[i]) for i in (1, 2, 3, 6, 7, 8) if i < len(parts))
    return busy / _TICKS


@dataclass
class Watched:
    """One line of the resource table: a process, or a group of them (PostgreSQL)."""

    label: str
    pids: Callable[[], list[int]]
    pss: bool = False  # sum PSS instead of RSS (processes sharing memory)
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> CPU s at the last reading
    wait: dict[int, float] = field(default_factory=dict)  # pid -> runqueue wait s, likewise

    def read(self, seconds: float) -> dict[str, float]:
        """RSS (or PSS) now, MiB; CPU (cores) since the previous reading, and the time its
        threads were runnable but waiting for a core (cores' worth: starved by neighbours)."""
        pids = self.pids()
        mem = sum((proc_pss_kib if self.pss else proc_rss_kib)(p) for p in pids)
        cpu = {p: proc_cpu_s(p) for p in pids}
        wait = {p: proc_sched_s(p)[1] for p in pids}
        used = sum(max(0.0, c - self.cpu.get(p, 0.0)) for p, c in cpu.items())
        waited = sum(max(0.0, w - self.wait.get(p, 0.0)) for p, w in wait.items())
        first = not self.cpu
        self.cpu, self.wait = cpu, wait
        span = max(seconds, 1e-6)
        return {
            "rss_mib": round(mem / 1024, 2),
            "cpu": 0.0 if first else round(used / span, 3),
            "wait": 0.0 if first else round(waited / span, 3),
            "procs": len(pids),
        }


async def _postmaster(dsn: str) -> int:
    """The postmaster of the cluster holding `dsn` (the parent of our own backend)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        return parent_pid(backend)
    finally:
        await conn.close()


async def watch_list(stack: BenchStack, loadgen: Sequence[int]) -> list[Watched]:
    def fixed(*pids: int) -> Callable[[], list[int]]:
        return lambda: [p for p in pids if p and os.path.exists(f"/proc/{p}")]

    out: list[Watched] = []
    names = {"a": "gateway A", "b": "gateway B"}
    for p in stack.procs:
        kind = p.name.split("-")[1]
        label = names.get(kind, f"fan-out worker {kind[1:]}" if kind.startswith("f") else kind)
        out.append(Watched(label, fixed(p.pid)))
    if stack.broker is not None:
        out.append(Watched("broker (Tansu)", fixed(stack.broker.pid)))
    r = aioredis.Redis.from_url(stack.settings.redis_url)
    try:
        redis_pid = int((await r.info("server"))["process_id"])
    finally:
        await r.aclose()
    out.append(Watched("Redis", fixed(redis_pid)))
    postmaster = await _postmaster(stack.settings.shard_dsns[0])
    out.append(Watched("PostgreSQL", lambda: [postmaster, *child_pids(postmaster)], pss=True))
    out.append(Watched("load generator", fixed(os.getpid(), *loadgen)))
    return out


class BrokerLog:
    """How many records the broker holds in the messages topic: end offsets minus start
    offsets (a memory-only Tansu keeps every one)."""

    def __init__(self, settings: Settings) -> None:
        self.topic = messages_topic(settings)
        self.bootstrap = settings.kafka_bootstrap
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)

    async def start(self) -> None:
        await self.consumer.start()

    async def records(self) -> int:
        """-1 when the reading failed (a broker hiccup is a blank, not the end of the run)."""
        try:
            parts = self.consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            end = await self.consumer.end_offsets(tps)
            begin = await self.consumer.beginning_offsets(tps)
        except Exception:
            return -1
        return sum(end[tp] - begin[tp] for tp in tps)

    async def partitions(self, group: str) -> dict[int, dict[str, int]]:
        """Per partition: the log's end offset and `group`'s committed offset (-1: none),
        so records acked and never stored can be told apart: not yet fetched or fetched
        and committed past (-2 for both when the reading failed)."""
        # A consumer of the group that never subscribes (so never joins it): its
        # OffsetFetch reads the committed offsets (Tansu cannot answer the admin client's).
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False
        )
        try:
            await reader.start()
            parts = self.consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            end = await self.consumer.end_offsets(tps)
            committed = {tp: await reader.committed(tp) for tp in tps}
        except Exception:
            return {-2: {"end": -2, "committed": -2}}
        finally:
            await reader.stop()
        return {
            tp.partition: {
                "end": end[tp],
                "committed": -1 if committed[tp] is None else committed[tp],
            }
            for tp in tps
        }

    async def stop(self) -> None:
        await self.consumer.stop()


async def stored_total(pools: ShardPools, convs: Sequence[str]) -> int:
    """Messages stored in the shards for `convs` (their last seqs): acked minus this is
    the backlog upstream of the fan-out worker's write (broker and worker)."""
    total = 0
    for conv in convs:
        total += await messages.latest_seq(pools, int(conv))
    return total


async def redis_reading(settings: Settings, max_keys: int = 5_000_000) -> dict[str, Any]:
    """used_memory (the whole server) and the number of our keys (the run's prefix: the
    database may hold other runs' keys too); the count is one SCAN, bounded."""
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        mem = await r.info("memory")
        keys = 0
        async for _ in r.scan_iter(match=f"{settings.redis_prefix}:*", count=5000):
            keys += 1
            if keys >= max_keys:
                break
    finally:
        await r.aclose()
    return {"used_memory_mib": round(int(mem["used_memory"]) / 2**20, 2), "keys": keys}


async def redis_breakdown(settings: Settings, max_keys: int = 2_000_000) -> dict[str, Any]:
    """Our keys by kind (the name's second part: idem, route, node...): count and the mean
    MEMORY USAGE of up to 100 of each."""
    r = aioredis.Redis.from_url(settings.redis_url)
    counts: Counter[str] = Counter()
    samples: dict[str, list[bytes]] = defaultdict(list)
    try:
        seen = 0
        async for key in r.scan_iter(match=f"{settings.redis_prefix}:*", count=2000):
            kind = key.split(b":")[1].decode(errors="replace") if b":" in key else "?"
            counts[kind] += 1
            if len(samples[kind]) < 100:
                samples[kind].append(key)
            seen += 1
            if seen >= max_keys:
                break
        out: dict[str, Any] = {}
        for kind, n in counts.most_common():
            sizes = [await r.memory_usage(k) or 0 for k in samples[kind]]
            ttls = [await r.ttl(k) for k in samples[kind][:10]]
            out[kind] = {
                "keys": n,
                "bytes_per_key": round(sum(sizes) / max(1, len(sizes))),
                "ttl_s_sample": max(ttls) if ttls else None,
            }
        return out
    finally:
        await r.aclose()
