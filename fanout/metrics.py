"""Metrics of the Kafka-consuming workers (fan-out, scores): batches, records, lag.

Every consumer Agora makes comes from `fanout.kafka.make_consumer`, which returns a
`MeteredConsumer` when the process has installed `ConsumerMetrics`: the workers do not
need to know they are measured. One `getmany` that returns records is one batch (each
worker handles exactly one batch per non-empty `getmany`), and the time until the worker
asks for the next one is how long the batch took to sequence, persist and publish.

Lag per partition is the broker's high watermark minus the consumer's position, refreshed
after each batch and at most once a second when idle. Worker processes serve the numbers
on `AGORA_METRICS_PORT` (`run_with_metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from core import logs
from core.metrics import MetricsServer, ProcessRegistry
from core.settings import Settings
from fanout.positions import position_now

log = logging.getLogger("agora.metrics")

BATCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_REFRESH_S = 1.0


class ConsumerMetrics:
    def __init__(self, registry: ProcessRegistry) -> None:
        self.registry = registry
        self.batches = Counter(
            "agora_consumer_batches_total",
            "Non-empty batches taken from Kafka.",
            ["group"],
            registry=registry,
        )
        self.records = Counter(
            "agora_consumer_records_total",
            "Records taken from Kafka.",
            ["group"],
            registry=registry,
        )
        self.commits = Counter(
            "agora_consumer_commits_total",
            "Offset commits (one per handled batch).",
            ["group"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "agora_consumer_batch_seconds",
            "Time from taking a batch to asking for the next: how long handling it took.",
            ["group"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "agora_consumer_lag",
            "Records behind the high watermark, per partition this process owns.",
            ["group", "topic", "partition"],
            registry=registry,
        )
        self.held = Gauge(
            "agora_consumer_held_records",
            "Records held for retry because their shard, Redis or the dead-letter topic failed.",
            ["group"],
            registry=registry,
        )
        self.hold_faults = Counter(
            "agora_consumer_hold_faults_total",
            "Attempts that failed transiently and held their records (per shard, Redis, DLQ).",
            ["group"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "agora_consumer_dead_lettered_total",
            "Poison records produced to the dead-letter topic (and committed past).",
            ["group"],
            registry=registry,
        )
        self.skips_healed = Counter(
            "agora_consumer_skips_healed_total",
            "Fetches that skipped offsets; the consumer sought back and re-fetched them.",
            ["group"],
            registry=registry,
        )
        self.fetch_stalls = Counter(
            "agora_consumer_fetch_stalls_total",
            "Episodes of fetches answered empty below a partition's high watermark "
            "(fanout.stall); each raised the fetch wait while it lasted.",
            ["group"],
            registry=registry,
        )
        self.fetch_wait = Gauge(
            "agora_consumer_fetch_wait_ms",
            "The fetch wait in use: the setting, or longer while a fetch stall lasts.",
            ["group"],
            registry=registry,
        )
        self.restarts = Counter(
            "agora_worker_restarts_total",
            "Times the supervisor restarted this worker slot after an unexpected exit.",
            registry=registry,
        )


_installed: ConsumerMetrics | None = None


def install(registry: ProcessRegistry) -> ConsumerMetrics:
    """Meter every consumer this process makes from now on (called by the process root)."""
    global _installed
    _installed = ConsumerMetrics(registry)
    return _installed


def installed() -> ConsumerMetrics | None:
    return _installed


class MeteredConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    def __init__(self, *topics: str, metrics: ConsumerMetrics, group_id: str, **kwargs: Any):
        super().__init__(*topics, group_id=group_id, **kwargs)
        self._m = metrics
        self._group = group_id
        self._batch_started: float | None = None
        self._lag_at = 0.0
        self._lag_parts: set[TopicPartition] = set()
        # The group's children, looked up once: `labels()` takes a lock and hashes its
        # values on every call, three times a batch.
        self._batch_seconds = metrics.batch_seconds.labels(group_id)
        self._batches = metrics.batches.labels(group_id)
        self._records = metrics.records.labels(group_id)
        self._commits = metrics.commits.labels(group_id)

    async def getmany(self, *partitions: TopicPartition, **kwargs: Any) -> Any:
        now = time.monotonic()
        if self._batch_started is not None:
            self._batch_seconds.observe(now - self._batch_started)
            self._batch_started = None
        records = await super().getmany(*partitions, **kwargs)
        count = sum(len(recs) for recs in records.values())
        if count:
            self._batch_started = time.monotonic()
            self._batches.inc()
            self._records.inc(count)
        # At most once a second, batch or not: a gauge scraped every few seconds needs no
        # more, and the refresh asks every owned partition's position (issue 14: it was 3%
        # of a busy worker when done after every batch).
        if time.monotonic() - self._lag_at >= LAG_REFRESH_S:
            self._refresh_lag()
        return records

    async def commit(self, offsets: Any = None) -> None:
        await super().commit(offsets)
        self._commits.inc()

    def _refresh_lag(self) -> None:
        self._lag_at = time.monotonic()
        owned = set(self.assignment())
        for gone in self._lag_parts - owned:  # rebalanced away: not ours to report
            self._m.lag.remove(self._group, gone.topic, str(gone.partition))
        self._lag_parts = owned
        for tp in owned:
            high = self.highwater(tp)
            if high is None:
                continue  # not fetched yet: no watermark known
            pos = position_now(self, tp)  # from memory, not awaited (fanout.positions)
            if pos is None:
                continue
            self._m.lag.labels(self._group, tp.topic, str(tp.partition)).set(max(0, high - pos))


def worker_identity(role: str, index: int) -> str:
    return f"{socket.gethostname()}-{role}-{os.getpid()}-{index}"


async def run_with_metrics(
    settings: Settings,
    role: str,
    index: int,
    main: Callable[[Settings], Awaitable[None]],
    restarts: int = 0,
) -> None:
    """Run a worker's composition root with its metrics installed and, when
    AGORA_METRICS_PORT is set, served on port + index (index = worker process number).
    `restarts`: how often the supervisor restarted this slot before (a new process starts
    its counters at zero, so it carries the count over)."""
    node = worker_identity(role, index)
    logs.set_process(role=role, node=node)
    registry = ProcessRegistry({"role": role, "node": node})
    metrics = install(registry)
    if restarts:
        metrics.restarts.inc(restarts)
    server = None
    if settings.metrics_port:
        port = settings.metrics_port + index
        try:
            server = MetricsServer(registry, settings.metrics_host, port)
        except OSError as exc:
            # Metrics are not worth a worker that does not run: say so loudly and go on.
            log.error("metrics port %d unavailable (%s); running without /metrics", port, exc)
    try:
        await main(settings)
    finally:
        if server is not None:
            await asyncio.to_thread(server.close)
