"""The workers never lose an acked message: database faults by SQLSTATE with traffic
running, poison to the dead-letter topic and back, fetches that skip offsets, a worker
killed with SIGKILL. Real engines and processes throughout; each fault test ends with every
acked message stored exactly once and delivered once, in seq order, to every subscriber,
and the same worker process alive with no traceback in its log.

The database faults are set per shard database (`ALTER DATABASE`), so only this session's
databases on the private PostgreSQL of AGORA_TEST_PG are touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import RecordMetadata

import fanout.worker
from agora_client import AgoraClient, ServerError
from core.settings import Settings
from devstack import services
from fanout import deadletter
from fanout.deadletter import DeadLetters
from fanout.envelope import Vote, encode_new_message, encode_vote
from fanout.feeds import FeedCache
from fanout.holding import CATCH_ALL_KEY, Outcome, Raw, Record, fenced_key
from fanout.kafka import (
    dlq_topic,
    ensure_topics,
    fanout_group,
    make_consumer,
    messages_topic,
    scores_group,
    votes_topic,
)
from fanout.routing import Routes
from fanout.scores import Pending, ScoresWorker
from fanout.worker import FanoutWorker
from storage import conversations, messages, notifications
from storage.fence import fence, unfence
from storage.ids import IdGenerator, compose, shard_of_id
from storage.models import NewMessage
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine
from tests.engines import free_port
from tests.faults import (
    Fault,
    OwnRedis,
    Target,
    deadlock,
    read_only_3s,
    row_locked,
    terminate_others,
    terminate_repeatedly,
    timeout_fault,
)
from tests.integration.helpers import agora as agora_cli
from tests.integration.helpers import collect, create_group, uid
from tests.integration.test_faults import Follower, report, send_steadily
from tests.integration.test_sequencer import raising_on_insert
from tests.stack import LOG_DIR, Proc, Stack

pytestmark = pytest.mark.engines


def child_pid(proc: Proc) -> int:
    """The pid of the worker process a supervisor started last (it logs it)."""
    found = re.findall(r"worker 0 started \(pid (\d+)\)", proc.log_text())
    assert found, f"{proc.name}: no worker start in its log"
    return int(found[-1])


def log_since_now(name: str) -> Callable[[], str]:
    """Reads the log of process `name` from this point on (logs are appended across runs)."""
    path = LOG_DIR / f"{name}.log"
    start = path.stat().st_size if path.exists() else 0

    def read() -> str:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    return read


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"\{.*\}", "", name)] = out.get(re.sub(r"\{.*\}", "", name), 0) + float(
                value
            )
    return out


def agora(settings: Settings, *args: str) -> str:
    done = agora_cli(settings, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def shard_dsn(settings: Settings, pools: ShardPools, conv: int) -> tuple[str, str]:
    dsn = settings.shard_dsns[pools.for_id(conv)]
    return dsn, urlsplit(dsn).path.lstrip("/")


# -- database faults with traffic running -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fault", "sqlstate"),
    [
        ("read-only", read_only_3s, "25006"),
        ("statement-timeout", timeout_fault("statement_timeout"), "57014"),
        ("lock-timeout", timeout_fault("lock_timeout"), "55P03"),
        ("deadlock", deadlock, "40P01"),
        ("terminated", terminate_repeatedly, None),
    ],
)
async def test_database_fault_with_traffic_loses_nothing(
    settings: Settings,
    http: httpx.AsyncClient,
    pools: ShardPools,
    name: str,
    fault: Fault,
    sqlstate: str | None,
) -> None:
    s = Stack(settings)
    try:
        g1, g2 = s.gateway(f"wf-{name}-g1"), s.gateway(f"wf-{name}-g2")
        worker_log = log_since_now(f"wf-{name}-f")
        w = s.fanout(f"wf-{name}-f")
        pid = child_pid(w)
        # Both conversations made by one owner (so on one shard), one sender each (a cid
        # is per sender).
        owner, senders = uid("o"), [uid("s") for _ in range(2)]
        readers = [uid("r") for _ in range(3)]
        convs = [await create_group(http, s, g1, owner, senders + readers) for _ in range(2)]
        dsn, db = shard_dsn(settings, pools, int(convs[0]))
        assert shard_dsn(settings, pools, int(convs[1]))[1] == db  # the creator's shard
        followers = [
            Follower(s, [g1, g2] if i % 2 else [g2, g1], r, c)
            for i, r in enumerate(readers)
            for c in convs
        ]
        for f in followers:
            f.start()
        await asyncio.sleep(1.0)
        count = 400
        sending = [
            asyncio.create_task(send_steadily(s, [g1, g2], u, c, count, 0.01))
            for u, c in zip(senders, convs, strict=True)
        ]
        await wait_for(lambda: len(followers[0].seqs) >= 20, 30, "traffic to flow")
        admin = await asyncpg.connect(dsn)
        try:
            await fault(Target(admin, dsn, db, [int(c) for c in convs], worker_log))
        finally:
            await admin.close()
        healed = time.time()
        print(f"{name}: fault injected and healed")
        results = [await t for t in sending]
        for acked, _ in results:
            assert len(acked) == count
        await wait_for(lambda: all(len(f.seqs) >= count for f in followers), 60, "every delivery")
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        for f in followers:
            await f.finish()
        for c, (acked, failures) in zip(convs, results, strict=True):
            stored = await messages.after(pools, int(c), 0, 10_000)
            mine = [f for f in followers if f.conv == c]
            for f in mine:
                report(
                    f"{name} {f.user} (failed attempts {failures})",
                    count,
                    acked,
                    f.seqs,
                    len(stored),
                )
            assert sorted(str(m.id) for m in stored) == sorted(acked)  # exactly once
            assert [m.seq for m in stored] == list(range(1, count + 1))
            for f in mine:
                assert f.seqs == list(range(1, count + 1)), f"{f.user}: {len(f.seqs)} seqs"
        log = worker_log()
        back = [json.loads(line)["ts"] for line in log.splitlines() if "works again" in line]
        if back:
            at = datetime.fromisoformat(back[-1].replace("Z", "+00:00")).timestamp()
            print(f"{name}: the worker's shard worked again {at - healed:+.2f}s after healing")
        if sqlstate is not None:
            assert sqlstate in log, f"the fault ({sqlstate}) never reached the worker"
        assert alive(pid) and child_pid(w) == pid, "the worker process exited"
        assert "Traceback" not in log and "restarting" not in log
        assert "dead-lettered to" not in log
    finally:
        s.stop_all()


async def test_broker_paused_with_traffic_loses_nothing(
    settings: Settings, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    port = free_port()
    broker = services.start_tansu("127.0.0.1", port, services.Path(".agora/test/tansu-wf.log"))
    s = Stack(settings, extra_env={"AGORA_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"})
    try:
        g1, g2 = s.gateway("wf-bk-g1"), s.gateway("wf-bk-g2")
        worker_log = log_since_now("wf-bk-f")
        w = s.fanout("wf-bk-f")
        pid = child_pid(w)
        sender, reader = uid("s"), uid("r")
        conv = await create_group(http, s, g1, sender, [reader])
        followers = [Follower(s, [g1, g2], reader, conv), Follower(s, [g2, g1], reader, conv)]
        for f in followers:
            f.start()
        await asyncio.sleep(1.0)
        count = 300
        sending = asyncio.create_task(send_steadily(s, [g1, g2], sender, conv, count, 0.01))
        await wait_for(lambda: len(followers[0].seqs) >= 20, 30, "traffic to flow")
        broker.send_signal(signal.SIGSTOP)
        await asyncio.sleep(3)
        broker.send_signal(signal.SIGCONT)
        print("broker paused 3 s and resumed")
        acked, failures = await sending
        assert len(acked) == count
        await wait_for(lambda: all(len(f.seqs) >= count for f in followers), 60, "deliveries")
        await asyncio.sleep(0.5)
        for f in followers:
            await f.finish()
        stored = await messages.after(pools, int(conv), 0, 10_000)
        for f in followers:
            report(f"broker pause (failed attempts {failures})", count, acked, f.seqs, len(stored))
            assert f.seqs == list(range(1, count + 1))
        assert sorted(str(m.id) for m in stored) == sorted(acked)
        assert alive(pid) and child_pid(w) == pid
        assert "Traceback" not in worker_log() and "dead-lettered to" not in worker_log()
    finally:
        s.stop_all()
        broker.kill()


# -- poison to the dead-letter topic, and back ---------------------------------------------


async def test_poison_is_dead_lettered_the_partition_goes_on_and_replay_stores_it(
    settings: Settings, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    metrics_port = free_port()
    s = Stack(settings, extra_env={"AGORA_METRICS_PORT": str(metrics_port)})
    s.expect_log(r"dead-lettered to ")  # the poison records, on purpose
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        g = s.gateway("dlq-g")
        worker_log = log_since_now("dlq-f")
        s.fanout("dlq-f")
        a = uid("a")
        bad_conv = int(await create_group(http, s, g, a, []))
        good_conv = int(await create_group(http, s, g, a, []))
        c = await AgoraClient.connect(g.ws_url, s.token(a))
        await c.sub(str(bad_conv))
        await c.sub(str(good_conv))
        before = len(agora(settings, "dlq", "list").splitlines())
        # The conversation's seq counter cannot move: its UPDATE overflows bigint (22003,
        # a data exception): the message can never be stored as things are.
        async with pools.connection(pools.for_id(bad_conv)) as conn:
            await conn.execute(
                "UPDATE conversations SET last_seq = 9223372036854775807 WHERE id = $1", bad_conv
            )
        # Acked, or (while the gateway waits to see a send stored, after it saw Redis
        # lose its data) answered `unavailable` once it gave up waiting: either way the
        # broker has it.
        try:
            poison_id: str | None = (await c.send(str(bad_conv), "stuck", cid="poison"))["id"]
        except ServerError as exc:
            assert exc.code == "unavailable", exc.frame
            poison_id = None
        # A record that is not an envelope at all, on the same partition as the good
        # conversation's messages (same key), ahead of them.
        meta = await producer.send_and_wait(
            messages_topic(settings), b"\xc1garbage", key=str(good_conv).encode()
        )
        ok = [await c.send(str(good_conv), f"ok {i}", cid=f"ok{i}") for i in range(5)]
        got = await collect(c, str(good_conv), 5, 30)
        assert [f["id"] for f in got] == [a["id"] for a in ok]  # the partition went on
        await wait_for(lambda: worker_log().count("dead-lettered to") >= 2, 30, "dead letters")

        listing = agora(settings, "dlq", "list")
        print(listing)
        lines = listing.splitlines()
        assert len(lines) == before + 2
        assert sum("22003" in line for line in lines) == 1
        garbage = [line for line in lines if f"[{meta.partition}]@{meta.offset} " in line]
        assert garbage and "undecodable" in garbage[0]
        assert scrape(metrics_port)["agora_consumer_dead_lettered_total"] == 2

        # Nothing of the poison is stored; the cause is fixed; it is replayed.
        assert await messages.after(pools, bad_conv, 0, 10) == []
        async with pools.connection(pools.for_id(bad_conv)) as conn:
            await conn.execute("UPDATE conversations SET last_seq = 0 WHERE id = $1", bad_conv)
        offset = next(line.split()[0].split(":")[1] for line in lines if "22003" in line)
        out = agora(settings, "dlq", "replay", "--offset", offset)
        print(out)
        assert "replayed 1 records" in out
        got = await collect(c, str(bad_conv), 1, 30)
        assert [(f["seq"], f["cid"]) for f in got] == [(1, "poison")]
        assert poison_id in (None, got[0]["id"])
        stored = await messages.after(pools, bad_conv, 0, 10)
        assert [(str(m.id), m.seq) for m in stored] == [(got[0]["id"], 1)]
        # The client's retry of the cid is answered with the stored message's id.
        assert (await c.send(str(bad_conv), "stuck", cid="poison"))["id"] == got[0]["id"]
        assert "Traceback" not in worker_log()
        await c.close()
    finally:
        await producer.stop()
        s.stop_all()


# -- a worker killed with SIGKILL comes back -------------------------------------------------


async def test_supervisor_restarts_a_killed_worker_and_messages_keep_flowing(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    metrics_port = free_port()
    s = Stack(settings, extra_env={"AGORA_METRICS_PORT": str(metrics_port)})
    # The worker it kills on purpose; the supervisor says so at ERROR.
    s.expect_log(r"^agora\.supervisor: fanout worker \d+ \(pid \d+\) exited with -9")
    try:
        g = s.gateway("sv-g")
        worker_log = log_since_now("sv-f")
        w = s.fanout("sv-f")
        first = child_pid(w)
        a = uid("a")
        conv = await create_group(http, s, g, a, [])
        c = await AgoraClient.connect(g.ws_url, s.token(a))
        await c.sub(conv)
        await c.send(conv, "before", cid="before")
        assert len(await collect(c, conv, 1, 15)) == 1
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: child_pid(w) != first, 15, "a new worker process")
        assert w.alive() and not alive(first)
        assert f"worker 0 (pid {first}) exited with -9" in worker_log()
        acks = [await c.send(conv, f"after {i}", cid=f"after{i}") for i in range(10)]
        got = await collect(c, conv, 10, 60)
        assert [f["id"] for f in got] == [ack["id"] for ack in acks]
        assert [f["seq"] for f in got] == list(range(2, 12))
        await wait_for(lambda: _restarts(metrics_port) == 1, 10, "the restart metric")
        await c.close()
    finally:
        s.stop_all()
    assert not alive(child_pid(w)), "the worker outlived its supervisor's SIGTERM"


def _restarts(port: int) -> float:
    try:
        return scrape(port).get("agora_worker_restarts_total", 0)
    except OSError:
        return -1


# -- a fetch that skips offsets is healed ----------------------------------------------------


class IsolatedWorker:
    """A fan-out worker run in this process on a topic of its own, one conversation, and a
    producer writing that conversation's records straight to the topic."""

    def __init__(
        self, settings: Settings, pools: ShardPools, redis_client: aioredis.Redis, tag: str
    ) -> None:
        isolated = settings.with_overrides(kafka_topic_prefix=f"{tag}{secrets.token_hex(3)}")
        self.settings = isolated
        self.pools = pools
        self.topic = messages_topic(isolated)
        self.consumer = make_consumer(isolated, self.topic, fanout_group(isolated))
        self.worker = FanoutWorker(isolated, pools, redis_client, self.consumer)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        self.ids = IdGenerator()
        self.conv = self.ids.next_id(7)

    async def send(self, i: int) -> tuple[int, int]:
        """Produce message `c{i}`; its (partition, offset)."""
        meta = await produce_text(self.producer, self.topic, self.ids, self.conv, i)
        return meta.partition, meta.offset

    async def stored(self) -> int:
        return len(await messages.after(self.pools, self.conv, 0, 100))

    async def until_stored(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while await self.stored() < count:
            assert time.monotonic() < deadline, f"stored {await self.stored()} of {count}"
            await asyncio.sleep(0.05)

    async def until_committed(self, tp: TopicPartition, offset: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while await self.consumer.committed(tp) != offset:
            assert time.monotonic() < deadline, f"committed {await self.consumer.committed(tp)}"
            await asyncio.sleep(0.05)


async def produce_text(
    producer: AIOKafkaProducer, topic: str, ids: IdGenerator, conv: int, i: int
) -> RecordMetadata:
    """Produce text `c{i}` ("m{i}", from "x") of `conv` as a gateway would; its metadata."""
    m = NewMessage(
        conv=conv,
        id=ids.next_id(shard_of_id(conv)),
        sender="x",
        cid=f"c{i}",
        body=f"m{i}",
        ts=int(time.time() * 1000),
        kind="text",
    )
    return await producer.send_and_wait(topic, encode_new_message(m), key=str(conv).encode())


@contextlib.asynccontextmanager
async def isolated_worker(
    settings: Settings,
    pools: ShardPools,
    redis_client: aioredis.Redis,
    tag: str,
    before: Callable[[IsolatedWorker], Awaitable[None]] | None = None,
) -> AsyncIterator[IsolatedWorker]:
    """`before`: what to do to the topic (its producer started) before the worker starts."""
    w = IsolatedWorker(settings, pools, redis_client, tag)
    await ensure_topics(w.settings)
    w.consumer.subscribe([w.topic], listener=w.worker.listener())
    await w.producer.start()
    if before is not None:
        await before(w)
    await w.consumer.start()
    async with pools.transaction(pools.for_id(w.conv)) as conn:
        await conn.execute(
            "INSERT INTO conversations (id, kind, created_by) VALUES ($1, 'group', 'x')", w.conv
        )
    task = asyncio.create_task(w.worker.run())
    try:
        yield w
    finally:
        w.worker.stopping.set()
        await task
        await w.consumer.stop()
        await w.producer.stop()


async def test_a_fetch_that_skips_offsets_is_sought_back_and_nothing_is_lost(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    async with isolated_worker(settings, pools, redis_client, "skip") as w:
        part, first = await w.send(0)
        tp = TopicPartition(w.topic, part)
        await w.until_stored(1, 30)
        # What the broker did in issue 18: the next fetch starts past records it has.
        w.consumer.seek(tp, first + 4)
        for i in range(1, 8):
            await w.send(i)
        await w.until_stored(8, 30)
        got = await messages.after(pools, w.conv, 0, 100)
        assert [m.cid for m in got] == [f"c{i}" for i in range(8)]
        assert [m.seq for m in got] == list(range(1, 9))
        assert w.worker.skips_healed >= 1
        # Nothing was committed past the skip: the group's offset is the end.
        await w.until_committed(tp, first + 8, 10)


async def test_a_fetch_that_skips_its_last_offsets_is_sought_back_with_nothing_after(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    """The skip at the end of a fetch: the consumer's position moves past records and no
    later record comes to show the gap (the last messages of a quiet partition). The
    worker sees its position past what it took and fetches them again."""
    async with isolated_worker(settings, pools, redis_client, "tail") as w:
        part, first = await w.send(0)
        tp = TopicPartition(w.topic, part)
        await w.until_stored(1, 30)
        # The position moves past offsets 1-3, and nothing is ever produced after them.
        w.consumer.seek(tp, first + 4)
        for i in range(1, 4):
            await w.send(i)
        await w.until_stored(4, 15)
        got = await messages.after(pools, w.conv, 0, 100)
        assert [m.cid for m in got] == [f"c{i}" for i in range(4)]
        assert w.worker.skips_healed >= 1
        await w.until_committed(tp, first + 4, 10)


# -- a broker that answers a partition empty below its high watermark ----------------------

# Tansu 0.6 (memory-only) reads a partition's whole log on each fetch: at ~40,000 batches
# that takes longer than the tests' 20 ms wait, and it answers the partition empty
# (bench/RESULTS.md, "fetch stalls"; at 15,000 it still answered in 12 ms).
STALL_BATCHES = 40_000


async def fill(producer: AIOKafkaProducer, tp: TopicPartition, batches: int) -> None:
    """`batches` one-record batches (what a worker's partition gets at a few hundred
    messages a second), 200 in flight: ~20 s for 40,000 on the 2-core dev machine."""
    sent: list[asyncio.Future[RecordMetadata]] = []
    for _ in range(batches):
        batch = producer.create_batch()
        batch.append(key=None, value=b"filler", timestamp=None)
        batch.close()
        sent.append(await producer.send_batch(batch, tp.topic, partition=tp.partition))
        if len(sent) >= 200:
            await asyncio.gather(*sent)
            sent = []
    await asyncio.gather(*sent)


async def records_at(bootstrap: str, tp: TopicPartition, offset: int, wait_ms: int) -> int:
    """How many records a plain consumer fetching with `wait_ms` gets at `offset` in 1.5 s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, fetch_max_wait_ms=wait_ms, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        got = await consumer.getmany(timeout_ms=1500)
        return sum(len(recs) for recs in got.values())
    finally:
        await consumer.stop()


async def test_a_partition_fetched_empty_below_its_high_watermark_heals_with_a_longer_wait(
    settings: Settings,
    pools: ShardPools,
    redis_client: aioredis.Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The soak's stall, at CI size: the worker's partition holds 40,000 batches, its
    committed offset is near the end, and the broker answers every 20 ms fetch of it
    empty. The worker sees its position below the high watermark with no records, says
    so once, fetches with a longer wait and stores the messages."""
    assert settings.kafka_fetch_wait_ms == 20  # tests/engines.py: what the soak ran with
    port = free_port()
    broker = services.start_tansu("127.0.0.1", port, tmp_path / "tansu.log")
    own = settings.with_overrides(kafka_bootstrap=f"127.0.0.1:{port}", kafka_partitions=1)
    caplog.set_level(logging.WARNING, logger="agora.fanout")

    async def long_log(w: IsolatedWorker) -> None:
        tp = TopicPartition(w.topic, 0)
        await fill(w.producer, tp, STALL_BATCHES)
        # The group is past the filler (it is no message): the worker starts at its end.
        committer = AIOKafkaConsumer(
            bootstrap_servers=own.kafka_bootstrap,
            group_id=fanout_group(w.settings),
            enable_auto_commit=False,
        )
        await committer.start()
        try:
            committer.assign([tp])
            await committer.commit({tp: STALL_BATCHES})
        finally:
            await committer.stop()
        for i in range(5):
            await w.send(i)
        if await records_at(own.kafka_bootstrap, tp, STALL_BATCHES, 20):
            pytest.skip("this broker answered the long partition at 20 ms: no stall to heal")
        assert await records_at(own.kafka_bootstrap, tp, STALL_BATCHES, 200) == 5

    try:
        async with isolated_worker(own, pools, redis_client, "stall", long_log) as w:
            await w.until_stored(5, 30)
            got = await messages.after(pools, w.conv, 0, 100)
            assert [m.cid for m in got] == [f"c{i}" for i in range(5)]
            assert w.worker.stalls.episodes == 1
            assert w.worker.stalls.wait_ms > 20
            await w.until_committed(TopicPartition(w.topic, 0), STALL_BATCHES + 5, 10)
        warned = [r for r in caplog.records if "come back empty" in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in warned]
        assert "lag 5" in warned[0].getMessage()
    finally:
        broker.kill()
        broker.wait()


async def test_a_slow_worker_with_a_backlog_on_several_partitions_is_no_stall(
    settings: Settings,
    pools: ShardPools,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker catching up: every partition's records already fetched, handed out a batch
    at a time from one partition after another (aiokafka's getmany drains its buffer in
    order), each batch slow. A partition whose records wait in that buffer is behind its
    high watermark with no record for seconds and many rounds: no broker stall, so no
    WARNING and no longer fetch wait."""
    partitions, per_partition, batch = 4, 200, 25
    own = settings.with_overrides(fanout_batch_max=batch)
    caplog.set_level(logging.WARNING, logger="agora.fanout")
    ids = IdGenerator()
    convs = [await _conversation(pools, ids, 40 + p) for p in range(partitions)]
    w = InProcess(own, "msg")
    await ensure_topics(w.settings)
    # The backlog first, each conversation on a partition of its own.
    filler = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await filler.start()
    try:
        sent = [
            await filler.send(
                w.topic,
                encode_new_message(_message(conv, ids, f"b{i}")),
                key=str(conv).encode(),
                partition=p,
            )
            for i in range(per_partition)
            for p, conv in enumerate(convs)
        ]
        await asyncio.gather(*sent)
    finally:
        await filler.stop()
    apply_batch = FanoutWorker.apply_batch
    sizes: list[int] = []

    async def slow(self: FanoutWorker, work: list[Record[NewMessage]]) -> Outcome[NewMessage]:
        sizes.append(len(work))
        await asyncio.sleep(0.15)  # a busy shard: the 32 batches take ~5 s
        return await apply_batch(self, work)

    monkeypatch.setattr(FanoutWorker, "apply_batch", slow)
    # The shard itself is not what is slow here: on a loaded machine a batch that took
    # over the 1 s slow-shard bound was held and retried together with the next ones
    # (a batch of 400), which is another scenario than the one tested.
    monkeypatch.setattr(fanout.worker, "SLOW_SHARD_S", 30.0)
    worker = await w.start(pools, redis_client)
    try:
        deadline = time.monotonic() + 60
        for conv in convs:
            while len(await messages.after(pools, conv, 0, 1000)) < per_partition:
                assert time.monotonic() < deadline, f"{conv}: not all stored"
                await asyncio.sleep(0.1)
        for conv in convs:
            got = [(m.cid, m.seq) for m in await messages.after(pools, conv, 0, 1000)]
            assert got == [(f"b{i}", i + 1) for i in range(per_partition)]
        # The backlog was taken in batches (so partitions waited for rounds), not at once.
        assert max(sizes) <= batch and len(sizes) >= partitions * per_partition // batch
        warned = [r.getMessage() for r in caplog.records if "come back empty" in r.getMessage()]
        assert worker.stalls.episodes == 0, warned
        assert worker.stalls.wait_ms == own.kafka_fetch_wait_ms
    finally:
        await w.stop()


# -- the scores worker: poison votes to their dead-letter topic ------------------------------


async def test_poison_votes_are_dead_lettered_and_the_rest_is_counted(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    isolated = settings.with_overrides(kafka_topic_prefix=f"pv{secrets.token_hex(3)}")
    await ensure_topics(isolated)
    topic = votes_topic(isolated)
    consumer = make_consumer(isolated, topic, scores_group(isolated))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    worker = ScoresWorker(
        isolated,
        pools,
        redis_client,
        consumer,
        DeadLetters(producer, dlq_topic(isolated, "votes")),
    )
    consumer.subscribe([topic], listener=worker.listener())
    await consumer.start()
    ids = IdGenerator()
    full, fine = ids.next_id(9), ids.next_id(9)  # one logical shard: one transaction
    physical = pools.for_id(full)
    async with pools.transaction(physical) as conn:
        for post, up in ((full, 2_147_483_647), (fine, 0)):
            await conn.execute(
                """INSERT INTO posts (id, author, community, title, thread_id, up)
                   VALUES ($1, 'x', 'c_pv', 't', $1, $2)""",
                post,
                up,
            )

    async def vote(post: int, user: str) -> None:
        async with pools.transaction(physical) as conn:
            await conn.execute(
                "INSERT INTO votes (post_id, user_id, value) VALUES ($1, $2, 1)", post, user
            )
        value = encode_vote(Vote(post, user, int(time.time() * 1000)))
        await producer.send_and_wait(topic, value, key=str(post).encode())

    task = asyncio.create_task(worker.run())
    try:
        # A counter at its limit: the UPDATE overflows (22003) for this vote only, in one
        # batch with votes that are fine (isolated one by one to find it).
        await producer.send_and_wait(topic, b"\x93not a vote", key=str(fine).encode())
        await vote(full, "u0")
        for i in range(3):
            await vote(fine, f"u{i}")
        deadline = time.monotonic() + 30
        while worker.dead_lettered < 2 or worker.done < 3:
            assert time.monotonic() < deadline, (worker.dead_lettered, worker.done)
            await asyncio.sleep(0.05)
        assert await _counters(pools, fine) == (3, 0)
        letters = await deadletter.read_all(isolated, "votes")
        errors = sorted(d.error for _, _, d in letters if d is not None)
        assert len(letters) == 2 and "22003" in errors[0] and "envelope" in errors[1], errors
        # Fixed (the counter recounted), then replayed: counted once.
        async with pools.connection(physical) as conn:
            await conn.execute("UPDATE posts SET up = 0 WHERE id = $1", full)
        stuck = [o for _, o, d in letters if d is not None and "22003" in d.error]
        assert len(await deadletter.replay(isolated, "votes", stuck)) == 1
        while await _counters(pools, full) != (1, 0):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert worker.held == [] and worker.letters == []
    finally:
        worker.stopping.set()
        await task
        await consumer.stop()
        await producer.stop()


def _unstarted_scores_worker(
    settings: Settings, pools: ShardPools, redis: aioredis.Redis
) -> ScoresWorker:
    """A scores worker whose `apply`/`apply_batch` a test calls directly: its consumer is
    never started."""
    consumer = make_consumer(settings, votes_topic(settings), scores_group(settings))
    return ScoresWorker(settings, pools, redis, consumer)


async def _counters(pools: ShardPools, post: int) -> tuple[int, int]:
    async with pools.connection(pools.for_id(post)) as conn:
        row = await conn.fetchrow("SELECT up, down FROM posts WHERE id = $1", post)
    assert row is not None
    return row["up"], row["down"]


# -- a rebalance takes a partition whose records are held ----------------------------------


async def test_held_records_of_a_revoked_partition_are_left_to_their_new_owner(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    isolated = settings.with_overrides(kafka_topic_prefix=f"rb{secrets.token_hex(3)}")
    await ensure_topics(isolated)
    topic = messages_topic(isolated)
    broken = ShardPools(
        isolated.with_overrides(
            shard_dsns=(settings.shard_dsns[0], "postgresql://x@127.0.0.1:1/no")
        )
    )
    ids = IdGenerator()
    conv = ids.next_id(4000)  # a logical shard of physical #1, the one `broken` cannot reach
    assert pools.for_id(conv) == 1
    async with pools.transaction(1) as conn:
        await conn.execute(
            "INSERT INTO conversations (id, kind, created_by) VALUES ($1, 'group', 'x')", conv
        )

    async def start(p: ShardPools) -> tuple[FanoutWorker, asyncio.Task[None]]:
        consumer = make_consumer(isolated, topic, fanout_group(isolated))
        worker = FanoutWorker(isolated, p, redis_client, consumer)
        consumer.subscribe([topic], listener=worker.listener())
        await consumer.start()
        return worker, asyncio.create_task(worker.run())

    async def stop(worker: FanoutWorker, task: asyncio.Task[None]) -> None:
        worker.stopping.set()
        await task
        await worker.consumer.stop()

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    a, a_task = await start(broken)
    started: list[tuple[FanoutWorker, asyncio.Task[None]]] = [(a, a_task)]
    try:
        for i in range(5):
            m = NewMessage(
                conv=conv,
                id=ids.next_id(4000),
                sender="x",
                cid=f"c{i}",
                body=f"m{i}",
                ts=int(time.time() * 1000),
                kind="text",
            )
            await producer.send_and_wait(topic, encode_new_message(m), key=str(conv).encode())
        await wait_for(lambda: len(a.held) == 5, 30, "the dead shard's messages held")
        generation = a.generation
        b, b_task = await start(pools)
        started.append((b, b_task))
        # The group rebalances: what `a` held is dropped, never committed past.
        await wait_for(lambda: a.generation > generation, 30, "the rebalance")
        assert a.held == [] or all(r.tp in a.consumer.assignment() for r in a.held)
        started.remove((a, a_task))
        await stop(a, a_task)  # `b` now owns every partition, from the committed offsets
        deadline = time.monotonic() + 30
        while len(got := await messages.after(pools, conv, 0, 10)) < 5:
            assert time.monotonic() < deadline, f"stored {len(got)} of 5"
            await asyncio.sleep(0.05)
        assert [(m.cid, m.seq) for m in got] == [(f"c{i}", i + 1) for i in range(5)]
    finally:
        for worker, task in started:
            await stop(worker, task)
        await producer.stop()
        await broken.close()


async def test_votes_on_a_read_only_shard_are_held_then_counted_once(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    isolated = settings.with_overrides(kafka_topic_prefix=f"ro{secrets.token_hex(3)}")
    await ensure_topics(isolated)
    topic = votes_topic(isolated)
    consumer = make_consumer(isolated, topic, scores_group(isolated))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    worker = ScoresWorker(
        isolated, pools, redis_client, consumer, DeadLetters(producer, dlq_topic(isolated, "votes"))
    )
    consumer.subscribe([topic], listener=worker.listener())
    await consumer.start()
    post = IdGenerator().next_id(11)
    dsn = settings.shard_dsns[pools.for_id(post)]
    db = urlsplit(dsn).path.lstrip("/")
    async with pools.transaction(pools.for_id(post)) as conn:
        await conn.execute(
            """INSERT INTO posts (id, author, community, title, thread_id)
               VALUES ($1, 'x', 'c_ro', 't', $1)""",
            post,
        )
        for i in range(5):  # the voters' rows, as the vote path writes them
            await conn.execute(
                "INSERT INTO votes (post_id, user_id, value) VALUES ($1, $2, 1)", post, f"u{i}"
            )
    admin = await asyncpg.connect(dsn)
    task = asyncio.create_task(worker.run())
    try:
        await admin.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
        await terminate_others(admin, db)
        for i in range(5):
            value = encode_vote(Vote(post, f"u{i}", int(time.time() * 1000)))
            await producer.send_and_wait(topic, value, key=str(post).encode())
        await wait_for(lambda: len(worker.held) == 5, 30, "the votes held")
        assert await consumer.committed(TopicPartition(topic, worker.held[0].tp.partition)) in (
            None,
            worker.held[0].offset,
        )
        await admin.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
        await terminate_others(admin, db)
        await wait_for(lambda: worker.held == [], 30, "the votes applied")
        assert await _counters(pools, post) == (5, 0)
        assert worker.dead_lettered == 0
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
        await admin.close()
        worker.stopping.set()
        await task
        await consumer.stop()
        await producer.stop()


async def test_a_poison_record_the_dead_letter_topic_refuses_is_held_not_committed_past(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    isolated = settings.with_overrides(kafka_topic_prefix=f"dl{secrets.token_hex(3)}")
    await ensure_topics(isolated)
    topic = messages_topic(isolated)
    consumer = make_consumer(isolated, topic, fanout_group(isolated))
    # A producer that is closed: every dead-letter produce fails, as with a broker that
    # refuses the topic.
    closed = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await closed.start()
    await closed.stop()
    worker = FanoutWorker(
        isolated,
        pools,
        redis_client,
        consumer,
        DeadLetters(closed, dlq_topic(isolated, "messages")),
    )
    consumer.subscribe([topic], listener=worker.listener())
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    await consumer.start()
    task = asyncio.create_task(worker.run())
    try:
        meta = await producer.send_and_wait(topic, b"\xc1not an envelope", key=b"1")
        tp = TopicPartition(topic, meta.partition)
        await wait_for(lambda: len(worker.letters) == 1, 30, "the poison held")
        await wait_for(lambda: worker.backoff.failing("dead-letter topic"), 10, "a backoff")
        assert await consumer.committed(tp) in (None, meta.offset)
        # The topic takes it again: dead-lettered, then committed past.
        worker.dead_letters = DeadLetters(producer, dlq_topic(isolated, "messages"))
        await wait_for(lambda: worker.letters == [], 30, "the dead letter sent")
        deadline = time.monotonic() + 10
        while await consumer.committed(tp) != meta.offset + 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        letters = await deadletter.read_all(isolated, "messages")
        assert [(d.offset, d.value) for _, _, d in letters if d is not None] == [
            (meta.offset, b"\xc1not an envelope")
        ]
    finally:
        worker.stopping.set()
        await task
        await consumer.stop()
        await producer.stop()


# -- in-process workers: what the loop does with records it cannot apply yet ---------------


class InProcess:
    """A fan-out or scores worker on its own topics, run as a task of the test (real
    broker, shards and Redis), with a producer for its topic and its dead letters."""

    def __init__(self, settings: Settings, kind: str) -> None:
        self.settings = settings.with_overrides(kafka_topic_prefix=f"{kind}{secrets.token_hex(3)}")
        self.kind = kind
        self.topic = (messages_topic if kind == "msg" else votes_topic)(self.settings)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        self.task: asyncio.Task[None] | None = None

    async def start(
        self, pools: ShardPools, redis: aioredis.Redis, line: RedisLine | None = None
    ) -> FanoutWorker | ScoresWorker:
        await ensure_topics(self.settings)
        await self.producer.start()
        s = self.settings
        letters = DeadLetters(
            self.producer, dlq_topic(s, "messages" if self.kind == "msg" else "votes")
        )
        if self.kind == "msg":
            consumer = make_consumer(s, self.topic, fanout_group(s))
            worker: FanoutWorker | ScoresWorker = FanoutWorker(
                s, pools, redis, consumer, letters, line
            )
        else:
            consumer = make_consumer(s, self.topic, scores_group(s))
            worker = ScoresWorker(s, pools, redis, consumer, letters)
        consumer.subscribe([self.topic], listener=worker.listener())
        await consumer.start()
        self.worker = worker
        self.task = asyncio.create_task(worker.run())
        return worker

    async def send(self, value: bytes, key: int) -> tuple[TopicPartition, int]:
        meta = await self.producer.send_and_wait(self.topic, value, key=str(key).encode())
        return TopicPartition(self.topic, meta.partition), meta.offset

    async def stop(self) -> None:
        if self.task is not None:
            self.worker.stopping.set()
            await self.task
            await self.worker.consumer.stop()
        await self.producer.stop()


def _message(conv: int, ids: IdGenerator, cid: str) -> NewMessage:
    return NewMessage(
        conv=conv,
        id=ids.next_id(shard_of_id(conv)),
        sender="x",
        cid=cid,
        body=f"body {cid}",
        ts=int(time.time() * 1000),
        kind="text",
    )


async def _conversation(pools: ShardPools, ids: IdGenerator, logical: int) -> int:
    conv = ids.next_id(logical)
    async with pools.transaction(pools.for_id(conv)) as conn:
        await conn.execute(
            "INSERT INTO conversations (id, kind, created_by) VALUES ($1, 'group', 'x')", conv
        )
    return conv


async def _stored(pools: ShardPools, conv: int) -> list[tuple[str, int]]:
    return [(m.cid, m.seq) for m in await messages.after(pools, conv, 0, 100)]


async def _wait_stored(pools: ShardPools, conv: int, want: list[tuple[str, int]]) -> None:
    deadline = time.monotonic() + 20
    while (got := await _stored(pools, conv)) != want:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.05)


async def test_ids_that_name_no_shard_are_dead_lettered_by_both_workers(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    nowhere = compose(int(time.time() * 1000), 5000, 1)  # a logical shard nobody has
    for kind, value in (
        ("msg", encode_new_message(_message(nowhere, IdGenerator(), "n1"))),
        ("vot", encode_vote(Vote(nowhere, "u1", int(time.time() * 1000)))),
    ):
        w = InProcess(settings, kind)
        worker = await w.start(pools, redis_client)
        try:
            tp, offset = await w.send(value, nowhere)
            await wait_for(lambda w=w: w.worker.dead_lettered == 1, 20, "the dead letter")
            which = "messages" if kind == "msg" else "votes"
            letters = await deadletter.read_all(w.settings, which)
            assert [(d.offset, d.error) for _, _, d in letters if d is not None] == [
                (
                    offset,
                    f"{'conversation' if kind == 'msg' else 'post'} id {nowhere} names no shard",
                )
            ]
            deadline = time.monotonic() + 10
            while await worker.consumer.committed(tp) != offset + 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await w.stop()


@pytest.mark.parametrize("over", ["pool", "line"])
async def test_messages_stored_while_redis_is_down_are_held_then_published_once(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis, over: str
) -> None:
    """`over`: the publish goes over redis-py's pool, or the pipelined line (the worker
    process's, storage/redisline.py)."""
    ids = IdGenerator()
    conv = await _conversation(pools, ids, 21)
    # Redis down for this worker: a client of a port nothing listens on (connection refused).
    down = aioredis.from_url("redis://127.0.0.1:1", socket_connect_timeout=1)
    down_line = RedisLine("redis://127.0.0.1:1", 1) if over == "line" else None
    back_line = RedisLine(settings.redis_url, 3) if over == "line" else None
    w = InProcess(settings, "msg")
    worker = await w.start(pools, down, down_line)
    assert isinstance(worker, FanoutWorker)
    try:
        tp, offset = await w.send(encode_new_message(_message(conv, ids, "r1")), conv)
        await wait_for(lambda: worker.backoff.failing("redis"), 20, "publish failing")
        # Stored (persist before publish) but held, and not committed past.
        assert await _stored(pools, conv) == [("r1", 1)]
        assert [r.hold for r in worker.held] == ["redis"]
        assert await worker.consumer.committed(tp) in (None, offset)
        # Redis is back: the retry finds it stored and publishes it under its seq.
        worker.routes = Routes(redis_client, RedisKeys(w.settings.redis_prefix), back_line)
        await wait_for(lambda: not worker.held and not worker.backoff.failing("redis"), 20, "sent")
        assert await _stored(pools, conv) == [("r1", 1)]
        if back_line is not None:
            assert back_line.connects == 1  # published over the line
    finally:
        await w.stop()
        await down.aclose()
        for line in (down_line, back_line):
            if line is not None:
                line.close()


async def test_votes_counted_while_redis_is_down_are_held_then_sent_once(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    post = IdGenerator().next_id(23)
    async with pools.transaction(pools.for_id(post)) as conn:
        await conn.execute(
            """INSERT INTO posts (id, author, community, title, thread_id)
               VALUES ($1, 'x', 'c_rd', 't', $1)""",
            post,
        )
        await conn.execute("INSERT INTO votes (post_id, user_id, value) VALUES ($1, 'u0', 1)", post)
    down = aioredis.from_url("redis://127.0.0.1:1", socket_connect_timeout=1)
    w = InProcess(settings, "vot")
    worker = await w.start(pools, down)
    assert isinstance(worker, ScoresWorker)
    try:
        await w.send(encode_vote(Vote(post, "u0", int(time.time() * 1000))), post)
        await wait_for(lambda: worker.backoff.failing("redis"), 20, "the feeds failing")
        assert await _counters(pools, post) == (1, 0)  # counted, then held for Redis
        keys = RedisKeys(w.settings.redis_prefix)
        worker.routes = Routes(redis_client, keys)
        worker.feeds = FeedCache(redis_client, keys, pools)
        await wait_for(lambda: not worker.held, 20, "the totals sent")
        assert await _counters(pools, post) == (1, 0)  # counted once
    finally:
        await w.stop()
        await down.aclose()


async def test_a_shard_with_an_attempt_still_running_gets_no_new_one_until_it_ends(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    ids = IdGenerator()
    conv = await _conversation(pools, ids, 25)
    shard = pools.names[pools.for_id(conv)]
    w = InProcess(settings, "msg")
    worker = await w.start(pools, redis_client)
    assert isinstance(worker, FanoutWorker)
    try:
        async with row_locked(settings.shard_dsns[pools.for_id(conv)], conv):
            await w.send(encode_new_message(_message(conv, ids, "b1")), conv)
            await wait_for(lambda: bool(worker.slow), 20, "an attempt left running")
            await w.send(encode_new_message(_message(conv, ids, "b2")), conv)
            # The next rounds hold the shard's records untried while the attempt runs.
            rounds = worker.batches
            await wait_for(lambda: worker.batches >= rounds + 2, 20, "rounds")
            assert {r.hold for r in worker.held} == {shard}
            assert len(worker.slow) == 1  # one attempt in flight, not one per round
        await _wait_stored(pools, conv, [("b1", 1), ("b2", 2)])
        await wait_for(lambda: not worker.held, 20, "nothing held")
    finally:
        await w.stop()


async def test_a_fence_holds_only_its_logical_shard_and_a_later_message_waits_for_it(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    """Behind a shard move's fence the worker holds the fenced logical shard's messages
    under their own backoff: a message of another logical shard of the same database, after
    them in the same partition, is stored meanwhile, and the partition's committed offset
    stays at the oldest held one. A later message of the held shard waits for them even
    when the fence is lifted while they wait out their backoff: stored first, it would
    take their seq."""
    ids = IdGenerator()
    moving = await _conversation(pools, ids, 1777)
    staying = await _conversation(pools, ids, 1778)
    physical = pools.for_id(moving)
    assert pools.for_id(staying) == physical
    key = fenced_key(1777)
    w = InProcess(settings, "msg")
    worker = await w.start(pools, redis_client)
    assert isinstance(worker, FanoutWorker)
    loop = asyncio.get_running_loop()
    try:
        await fence(pools, physical, [1777])
        try:
            # One partition (keyed by the moving conversation) for all three records.
            tp, held_at = await w.send(encode_new_message(_message(moving, ids, "f1")), moving)
            await wait_for(lambda: [r.hold for r in worker.held] == [key], 20, "f1 held")
            await w.send(encode_new_message(_message(staying, ids, "s1")), moving)
            await _wait_stored(pools, staying, [("s1", 1)])
            assert await _stored(pools, moving) == []
            assert [r.item.cid for r in worker.held] == ["f1"]
            assert not worker.backoff.failing(pools.names[physical])
            await worker.commits.flush(5)
            assert await worker.consumer.committed(tp) in (None, held_at)
            # Its backoff long enough that f2 surely comes before f1's next attempt.
            await wait_for(lambda: worker.backoff.due_at(key) - loop.time() > 1, 30, "backoff")
        finally:
            await unfence(pools, physical)
        _, last = await w.send(encode_new_message(_message(moving, ids, "f2")), moving)
        await _wait_stored(pools, moving, [("f1", 1), ("f2", 2)])
        await wait_for(lambda: not worker.held and not worker.backoff.failing(key), 20, "done")
        deadline = time.monotonic() + 10
        while await worker.consumer.committed(tp) != last + 1:
            assert time.monotonic() < deadline, "never committed past the held records"
            await asyncio.sleep(0.05)
    finally:
        await unfence(pools, physical)
        await w.stop()


async def test_a_fence_holds_only_the_votes_of_its_logical_shard(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    """Behind a shard move's fence the scores worker counts the votes of its database's
    other logical shards at once and holds only the fenced shard's, under that shard's own
    backoff key (votes are counted whatever their order: nothing else needs to wait)."""
    ids = IdGenerator()
    moving, staying = ids.next_id(1781), ids.next_id(1782)
    physical = pools.for_id(moving)
    assert pools.for_id(staying) == physical
    async with pools.transaction(physical) as conn:
        for post in (moving, staying):
            await conn.execute(
                """INSERT INTO posts (id, author, community, title, thread_id)
                   VALUES ($1, 'x', 'c_fence', 't', $1)""",
                post,
            )
            await conn.execute(
                "INSERT INTO votes (post_id, user_id, value) VALUES ($1, 'u0', 1)", post
            )
    worker = _unstarted_scores_worker(settings, pools, redis_client)
    tp = TopicPartition("votes", 0)
    work = [
        Record(Raw(tp, i, None, b""), Pending(tp, i, Vote(post, "u0", 1)), pools.names[physical])
        for i, post in enumerate((moving, staying))
    ]
    await fence(pools, physical, [1781])
    try:
        out = await worker.apply_batch(work)
        assert [(r.item.vote.post, r.hold) for r in out.held] == [(moving, fenced_key(1781))]
        assert list(out.failures) == [fenced_key(1781)]
        assert "being moved" in out.failures[fenced_key(1781)]
        assert await _counters(pools, staying) == (1, 0)
        assert await _counters(pools, moving) == (0, 0)
    finally:
        await unfence(pools, physical)
    again = await worker.apply_batch(out.held)
    assert again.held == [] and again.failures == {}
    assert await _counters(pools, moving) == (1, 0)


async def test_a_worker_holding_its_limit_takes_no_new_records_until_they_go(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    ids = IdGenerator()
    conv = await _conversation(pools, ids, 27)
    physical = pools.for_id(conv)
    w = InProcess(settings, "msg")
    worker = await w.start(pools, redis_client)
    worker.max_held = 2
    try:
        async with raising_on_insert(pools, physical, conv, "40001", once=False):
            for i in range(2):
                await w.send(encode_new_message(_message(conv, ids, f"h{i}")), conv)
            await wait_for(lambda: len(worker.held) == 2, 20, "two held")
            for i in range(2, 5):
                await w.send(encode_new_message(_message(conv, ids, f"h{i}")), conv)
            # Retried on their backoff, while the three new records wait in the broker.
            rounds = worker.batches
            await wait_for(lambda: worker.batches >= rounds + 3, 20, "retry rounds")
            assert [r.item.cid for r in worker.held] == ["h0", "h1"]
        await _wait_stored(pools, conv, [(f"h{i}", i + 1) for i in range(5)])
    finally:
        await w.stop()


async def test_a_transient_failure_while_isolating_poison_votes_holds_the_rest(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    ids = IdGenerator()
    full, fine = ids.next_id(29), ids.next_id(29)  # one physical shard: one transaction
    physical = pools.for_id(full)
    async with pools.transaction(physical) as conn:
        for post, up in ((full, 2_147_483_647), (fine, 0)):
            await conn.execute(
                """INSERT INTO posts (id, author, community, title, thread_id, up)
                   VALUES ($1, 'x', 'c_iso', 't', $1, $2)""",
                post,
                up,
            )
            await conn.execute(
                "INSERT INTO votes (post_id, user_id, value) VALUES ($1, 'u0', 1)", post
            )
    worker = _unstarted_scores_worker(settings, pools, redis_client)
    tp = TopicPartition("votes", 0)
    bad = Pending(tp, 0, Vote(full, "u0", 1))
    good = Pending(tp, 1, Vote(fine, "u0", 1))
    # The batch overflows `full`'s counter (poison); counting `fine` alone then meets a
    # serialization failure: a statement trigger that fires only for an UPDATE of `fine`
    # alone, so the batch's own failure stays the overflow whatever the row order.
    name = f"t_fault_{secrets.token_hex(4)}"
    async with pools.connection(physical) as conn:
        await conn.execute(
            f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF (SELECT array_agg(id) FROM n) = ARRAY[{fine}::bigint] THEN
                    RAISE EXCEPTION 'forced by the test' USING ERRCODE = '40001';
                  END IF;
                  RETURN NULL;
                END $$"""
        )
        await conn.execute(
            f"""CREATE TRIGGER {name} AFTER UPDATE ON posts REFERENCING NEW TABLE AS n
                FOR EACH STATEMENT EXECUTE FUNCTION {name}()"""
        )
    try:
        totals, held, errors, poison = await worker.apply([bad, good])
    finally:
        async with pools.connection(physical) as conn:
            await conn.execute(f"DROP TRIGGER {name} ON posts")
            await conn.execute(f"DROP FUNCTION {name}()")
    assert [(p.vote.post, why[:5]) for p, why in poison] == [(full, "22003")]
    assert held == [good] and totals == []
    assert [shard for shard, _ in errors] == [pools.names[physical]]
    assert "40001" in errors[0][1].message
    # The shard works again: the held vote is counted, once.
    totals, held, errors, poison = await worker.apply([good])
    assert [(t.id, t.up) for t in totals] == [(fine, 1)] and not (held or errors or poison)
    assert await _counters(pools, fine) == (1, 0) and await _counters(pools, full) == (
        2_147_483_647,
        0,
    )


async def test_a_direct_message_stays_in_the_inbox_when_redis_refuses_the_recipients_routes(
    settings: Settings, pools: ShardPools
) -> None:
    # A private Redis whose ACL lets the worker read conversation routes but not user
    # routes: the batch is stored and published, then finding the recipient's nodes
    # fails (NOPERM). The direct message is kept in the recipient's inbox before the batch
    # is held, since its retry finds it stored and notifies no one again.
    redis = OwnRedis()
    redis.start()
    admin = aioredis.Redis.from_url(redis.url)
    p = settings.redis_prefix
    await admin.execute_command(
        "ACL", "SETUSER", "w", "on", ">pw", "+@all", f"~{p}:route:c:*", f"~{p}:node:*"
    )
    worker_redis = aioredis.Redis.from_url(redis.url, username="w", password="pw")
    ids = IdGenerator()
    a, b = uid("dma"), uid("dmb")
    conv, _ = await conversations.create_direct(pools, ids, a, b)
    w = InProcess(settings, "msg")
    worker = await w.start(pools, worker_redis)
    try:
        m = _message(conv.id, ids, "d1")
        m = replace(m, sender=a)
        await w.send(encode_new_message(m), conv.id)
        await wait_for(lambda: worker.backoff.failing("redis"), 20, "the user routes refused")
        assert await _stored(pools, conv.id) == [("d1", 1)]
        inbox = await notifications.page(pools, b, None, 10, False)
        assert [(n.kind, n.sender, n.message) for n in inbox] == [("dm", a, m.id)]
        # Redis lets the worker read everything again: the held batch goes through, the
        # inbox entry is not doubled.
        await admin.execute_command("ACL", "SETUSER", "w", "allkeys")
        await wait_for(lambda: not worker.held, 20, "the batch done")
        assert len(await notifications.page(pools, b, None, 10, False)) == 1
    finally:
        await w.stop()
        await worker_redis.aclose()
        await admin.aclose()
        redis.kill()


async def test_an_unclassified_failure_holds_every_later_record_behind_it(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    """A batch that fails in a way nobody classified (a bug) is held under the catch-all
    key with whatever it had not stored. A later message of the same conversation must not
    be sequenced before it: it waits behind it, and both are stored in their order."""
    ids = IdGenerator()
    conv = await _conversation(pools, ids, 31)
    w = InProcess(settings, "msg")
    worker = await w.start(pools, redis_client)
    assert isinstance(worker, FanoutWorker)
    failing = True
    apply_batch = worker.apply_batch

    async def buggy(work: list[Record[NewMessage]]) -> Outcome[NewMessage]:
        # The bug: any batch with u1 in it fails before anything is stored.
        if failing and any(r.item.cid == "u1" for r in work):
            raise RuntimeError("a bug in the worker")
        return await apply_batch(work)

    worker.apply_batch = buggy  # type: ignore[method-assign]
    try:
        await w.send(encode_new_message(_message(conv, ids, "u1")), conv)
        await wait_for(lambda: [r.hold for r in worker.held] == [CATCH_ALL_KEY], 20, "u1 held")
        await w.send(encode_new_message(_message(conv, ids, "u2")), conv)
        await wait_for(lambda: len(worker.held) == 2, 20, "u2 held behind u1")
        assert {r.hold for r in worker.held} == {CATCH_ALL_KEY}
        assert await _stored(pools, conv) == []
        failing = False
        await _wait_stored(pools, conv, [("u1", 1), ("u2", 2)])
        await wait_for(lambda: not worker.held, 20, "nothing held")
    finally:
        await w.stop()


async def test_a_direct_message_whose_inbox_write_fails_is_held_then_kept_once(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> None:
    """The inbox entry of a direct message to an offline recipient is written after the
    commit; when its database refuses it, the stored batch is held under "inbox" (not the
    catch-all: nothing new waits behind it) and its retry writes the entry once."""
    ids = IdGenerator()
    a, b = uid("ina"), uid("inb")
    conv, _ = await conversations.create_direct(pools, ids, a, b)
    physical = pools.for_id(conv.id)
    name = f"t_inbox_{secrets.token_hex(4)}"
    async with pools.connection(physical) as conn:
        await conn.execute(
            f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'forced by the test' USING ERRCODE = '57014'; END $$"""
        )
        await conn.execute(
            f"CREATE TRIGGER {name} BEFORE INSERT ON notifications FOR EACH ROW"
            f" WHEN (NEW.user_id = '{b}') EXECUTE FUNCTION {name}()"
        )
    w = InProcess(settings, "msg")
    worker = await w.start(pools, redis_client)
    assert isinstance(worker, FanoutWorker)
    try:
        m = replace(_message(conv.id, ids, "i1"), sender=a)
        await w.send(encode_new_message(m), conv.id)
        await wait_for(lambda: worker.backoff.failing("inbox"), 20, "the inbox write refused")
        assert [r.hold for r in worker.held] == ["inbox"]
        assert await _stored(pools, conv.id) == [("i1", 1)]
        assert await notifications.page(pools, b, None, 10, False) == []
    finally:
        async with pools.connection(physical) as conn:
            await conn.execute(f"DROP FUNCTION {name}() CASCADE")
    try:
        await wait_for(lambda: not worker.held, 20, "the batch done")
        inbox = await notifications.page(pools, b, None, 10, False)
        assert [(n.kind, n.sender, n.message) for n in inbox] == [("dm", a, m.id)]
        assert await _stored(pools, conv.id) == [("i1", 1)]
    finally:
        await w.stop()
