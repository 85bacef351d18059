"""Run an Agora process with proposed fixes applied at run time, to measure them before
anyone changes the code (the benchmarks' `--experiment NAME[,NAME]`).

    python -m bench.experiment timing -- gateway --port 8000

Nothing here is used in production: each patch is a measurement aid or a proposal for the
owners of gateway/, fanout/ and storage/ (see bench/RESULTS.md, "Proposed fixes"). The
proposals measured here earlier (`gc`, `attach-batch`, `pg-noreset`, `frame-once`,
`direct-push`, `no-wire-metrics`) are in the code now, or moot since the gateway writes
frames itself (gateway/transport.py), and were removed from this file.

- `timing`: the send, access, subscribe and attach awaits are timed; totals are written
  to $BENCH_TIMING_OUT.<pid>.json every 2 s (where a slow ack waits).
- `batch-pace`: the workers start a batch at most every 25 ms (what a batch costs).
- `stages`: every process stamps where each message is (the send's arrival, the broker's
  ack, the worker's fetch, commit and publish, the receiving gateway's arrival and write),
  appended to $BENCH_STAGES_OUT.<pid>.jsonl; `bench.fanout` joins them with its clients'
  receive times into the delivery latency stage by stage (bench/stages.py).
- `tracemalloc`: SIGUSR1 takes a baseline snapshot, the next SIGUSR1 writes the top
  allocation sites since then to $BENCH_TRACEMALLOC_OUT (where per-connection memory goes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

PATCHES: dict[str, Callable[[], None]] = {}


def patch(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        PATCHES[name] = fn
        return fn

    return register


@patch("tracemalloc")
def _tracemalloc() -> None:
    tracemalloc.start(1)
    state: dict[str, tracemalloc.Snapshot] = {}
    out = os.environ.get("BENCH_TRACEMALLOC_OUT", "tracemalloc.txt")

    def on_signal(_signum: int, _frame: object) -> None:
        snap = tracemalloc.take_snapshot()
        if "base" not in state:
            state["base"] = snap
            return
        stats = snap.compare_to(state["base"], "lineno")
        total = sum(s.size_diff for s in stats)
        with open(out, "w") as f:
            f.write(f"total {total} bytes\n")
            for s in stats[:40]:
                f.write(f"{s.size_diff}\t{s.count_diff}\t{s.traceback}\n")

    signal.signal(signal.SIGUSR1, on_signal)


@patch("batch-pace")
def _batch_pace() -> None:
    """The workers start a batch at most every 25 ms (a measurement aid, not a proposal:
    it adds up to 25 ms of latency): with fewer, larger batches at the same message rate,
    the CPU-seconds show what a batch costs apart from its records (issue 14)."""
    from fanout.holding import HoldingWorker

    handle = HoldingWorker.handle

    async def paced(self: Any, records: Any) -> None:
        started = asyncio.get_running_loop().time()
        await handle(self, records)
        left = 0.025 - (asyncio.get_running_loop().time() - started)
        if left > 0:
            await asyncio.sleep(left)

    HoldingWorker.handle = paced  # type: ignore[method-assign]


@patch("kafka-count")
def _kafka_count() -> None:
    """Count what each process asks the broker, on its /metrics (a measurement aid):
    `bench_kafka_requests_total{api}` for every request aiokafka sends (Produce, Fetch,
    OffsetCommit, Heartbeat, ...), and per produce path (`aiokafka`, or the send path's
    `line`) `bench_kafka_produce_{requests,batches,records}_total`: records and partition
    batches per Produce request (issue 14: what the broker's CPU per message follows)."""
    from aiokafka.conn import AIOKafkaConnection
    from aiokafka.producer.sender import SendProduceReqHandler
    from prometheus_client.core import CounterMetricFamily

    from core.metrics import ProcessRegistry
    from gateway.produceline import _Connection

    apis: dict[str, int] = {}
    produced = {p: [0, 0, 0] for p in ("aiokafka", "line")}  # requests, batches, records

    send = AIOKafkaConnection.send

    def counted_send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        name = type(request).__name__.removesuffix("Request").split("_")[0]
        apis[name] = apis.get(name, 0) + 1
        return send(self, request, *args, **kwargs)

    AIOKafkaConnection.send = counted_send  # type: ignore[method-assign]

    create = SendProduceReqHandler.create_request

    def counted_create(self: Any) -> Any:
        p = produced["aiokafka"]
        p[0] += 1
        p[1] += len(self._batches)
        p[2] += sum(b.record_count for b in self._batches.values())
        return create(self)

    SendProduceReqHandler.create_request = counted_create  # type: ignore[method-assign]

    flush = _Connection._flush

    def counted_flush(self: Any) -> None:
        sent = self.line.requests
        queued = {k: len(v) for k, v in self.queue.items()}
        flush(self)
        if self.line.requests != sent:
            left = {k: len(v) for k, v in self.queue.items()}  # what did not fit
            p = produced["line"]
            p[0] += 1
            p[1] += len(queued)
            p[2] += sum(n - left.get(k, 0) for k, n in queued.items())

    _Connection._flush = counted_flush  # type: ignore[method-assign]

    class Counts:
        def collect(self) -> Any:
            m = CounterMetricFamily("bench_kafka_requests", "Requests sent", labels=["api"])
            for api, n in sorted(apis.items()):
                m.add_metric([api], n)
            yield m
            for i, what in enumerate(("requests", "batches", "records")):
                m = CounterMetricFamily(
                    f"bench_kafka_produce_{what}", f"Produce {what}", labels=["path"]
                )
                for path, counts in produced.items():
                    m.add_metric([path], counts[i])
                yield m

    init = ProcessRegistry.__init__

    def registered(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.register(Counts())

    ProcessRegistry.__init__ = registered  # type: ignore[method-assign]


@patch("timing")
def _timing() -> None:
    """Time the awaits of the send and subscribe paths; every 2 s the totals are written to
    $BENCH_TIMING_OUT.<pid>.json (JSON: name -> [count, total ms, max ms, over-100-ms count])."""
    import functools
    import json
    import time

    from gateway import node, send

    stats: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                ms = (time.perf_counter() - t) * 1000
                st = stats.setdefault(name, [0, 0.0, 0.0, 0])
                st[0] += 1
                st[1] += ms
                st[2] = max(st[2], ms)
                st[3] += ms > 100

        return wrapper

    sp = send.SendPath
    sp.send = timed("send (total)", sp.send)  # type: ignore[method-assign]
    sp._claim_or_get = timed("send: redis claim", sp._claim_or_get)  # type: ignore[method-assign]
    sp._produce = timed("send: kafka produce + redis set", sp._produce)  # type: ignore[method-assign]
    from gateway.access import Access

    Access.check = timed("access check", Access.check)  # type: ignore[method-assign]
    node.Node.subscribe = timed("subscribe (total)", node.Node.subscribe)  # type: ignore[method-assign]
    node.Node.attach = timed("attach", node.Node.attach)  # type: ignore[method-assign]
    loop_started = False

    def dump() -> None:
        # At dump time: a worker runs in a child its supervisor forks after this patch.
        out = os.environ.get("BENCH_TIMING_OUT", "timing") + f".{os.getpid()}.json"
        with open(out, "w") as f:
            json.dump({"pid": os.getpid(), "stats": stats}, f)

    original_start = node.Node.start

    async def start(self: Any) -> None:
        nonlocal loop_started
        await original_start(self)
        if not loop_started:
            loop_started = True

            async def every() -> None:
                while True:
                    await asyncio.sleep(2)
                    dump()

            self._tasks.append(asyncio.create_task(every()))

    node.Node.start = start  # type: ignore[method-assign]

    # The fan-out worker's round: sequence (PostgreSQL), publish (Redis), notify, and the
    # whole batch; the offset commits (Kafka, in the background since 1b37a05) apart;
    # written after a batch at most every 2 s.
    from fanout import consumer, holding, worker

    worker.sequence = timed("worker: sequence (postgres)", worker.sequence)  # type: ignore[attr-defined]
    worker.notify = timed("worker: notify", worker.notify)  # type: ignore[attr-defined]
    consumer._commit = timed("worker: commit offsets (background)", consumer._commit)
    fw = worker.FanoutWorker
    fw.publish = timed("worker: publish (redis)", fw.publish)  # type: ignore[method-assign]
    handle = timed("worker: batch (total)", holding.HoldingWorker.handle)
    last = [0.0]

    async def handle_and_dump(self: Any, records: Any) -> None:
        await handle(self, records)
        if time.monotonic() - last[0] > 2:
            last[0] = time.monotonic()
            dump()

    holding.HoldingWorker.handle = handle_and_dump  # type: ignore[method-assign]


@patch("stages")
def _stages() -> None:
    """Stamp each message (keyed by the send time its bench body starts with) at every
    stage it passes in this process: rows (key, stage, time_ns) appended every second to
    $BENCH_STAGES_OUT.<pid>.jsonl. Only the bench's bodies (19 digits first) are stamped.
    The receiving gateway decodes each delivery a second time here: a latency aid, not
    for CPU measurements."""
    import functools
    import json
    import time

    from aiokafka import AIOKafkaConsumer
    from aiokafka.consumer.fetcher import Fetcher

    from fanout import envelope, worker
    from gateway import node, send

    rows: list[tuple[str, str, int]] = []
    flushing = [False]

    def flush() -> None:
        out = os.environ.get("BENCH_STAGES_OUT", "stages") + f".{os.getpid()}.jsonl"
        batch = rows[:]
        del rows[:]
        if batch:
            with open(out, "a") as f:
                f.write("\n".join(json.dumps(r) for r in batch) + "\n")
        asyncio.get_running_loop().call_later(1.0, flush)

    def stamp(body: str, stage: str, t: int | None = None) -> None:
        key = body[:19]
        if not key.isdigit():
            return
        rows.append((key, stage, time.time_ns() if t is None else t))
        if not flushing[0]:
            flushing[0] = True
            asyncio.get_running_loop().call_later(1.0, flush)

    # The sending gateway: the send handed to the send path, the broker's ack, the ack.
    sp = send.SendPath
    send_fn, publish_fn = sp.send, sp._publish

    @functools.wraps(send_fn)
    async def timed_send(
        self: Any, user: str, conv: int, cid: str, body: str, *a: Any, **k: Any
    ) -> Any:
        stamp(body, "gw_recv")
        try:
            return await send_fn(self, user, conv, cid, body, *a, **k)
        finally:
            stamp(body, "acked")

    @functools.wraps(publish_fn)
    async def timed_publish(self: Any, message: Any, *a: Any, **k: Any) -> Any:
        try:
            return await publish_fn(self, message, *a, **k)
        finally:
            stamp(message.body, "produced")

    sp.send = timed_send  # type: ignore[method-assign]
    sp._publish = timed_publish  # type: ignore[method-assign]

    # The worker: the fetch request that brought the record (sent, answered), the batch
    # handed to the worker, its commit (sequence returns after it), its PUBLISH.
    fetched: list[tuple[int, int]] = []  # (sent, answered) of fetches that brought records
    proc_fetch = Fetcher._proc_fetch_request

    async def timed_fetch(self: Any, *a: Any, **k: Any) -> Any:
        t0 = time.time_ns()
        got = await proc_fetch(self, *a, **k)
        if got:
            fetched.append((t0, time.time_ns()))
        return got

    Fetcher._proc_fetch_request = timed_fetch  # type: ignore[method-assign]
    getmany = AIOKafkaConsumer.getmany

    async def timed_getmany(self: Any, *a: Any, **k: Any) -> Any:
        records = await getmany(self, *a, **k)
        if records:
            t = time.time_ns()
            sent, answered = fetched[-1] if fetched else (t, t)
            del fetched[:-1]
            for recs in records.values():
                for rec in recs:
                    try:
                        body = envelope.decode_new_message(rec.value).body
                    except Exception:
                        continue
                    stamp(body, "fetch_sent", sent)
                    stamp(body, "fetch_answered", answered)
                    stamp(body, "taken", t)
        return records

    AIOKafkaConsumer.getmany = timed_getmany  # type: ignore[method-assign]
    sequence = worker.sequence

    async def timed_sequence(pools: Any, batch: list[Any], *a: Any, **k: Any) -> Any:
        try:
            return await sequence(pools, batch, *a, **k)
        finally:
            t = time.time_ns()
            for m in batch:
                stamp(m.body, "stored", t)

    worker.sequence = timed_sequence  # type: ignore[attr-defined]
    from storage import onetrip

    append = onetrip.append

    async def timed_append(conn: Any, batch: list[Any]) -> Any:
        t = time.time_ns()
        for m in batch:
            stamp(m.body, "pg_sent", t)
        try:
            return await append(conn, batch)
        finally:
            t = time.time_ns()
            for m in batch:
                stamp(m.body, "pg_answered", t)

    onetrip.append = timed_append  # type: ignore[assignment]
    publish = worker.FanoutWorker.publish

    async def timed_worker_publish(self: Any, messages: list[Any]) -> None:
        try:
            await publish(self, messages)
        finally:
            t = time.time_ns()
            for m in messages:
                stamp(m.body, "published", t)

    worker.FanoutWorker.publish = timed_worker_publish  # type: ignore[method-assign]

    # The receiving gateway: the delivery read off pub/sub, and written to the sockets
    # (the inbox is drained in one call: every frame is written when it returns).
    on_delivery, drain = node.Node._on_delivery, node.Node._drain_inbox

    def timed_on_delivery(self: Any, data: bytes) -> None:
        t = time.time_ns()
        try:
            for m in envelope.decode_delivery(data).messages:
                stamp(m.body, "gw_arrived", t)
        except Exception:
            pass
        on_delivery(self, data)

    def timed_drain(self: Any) -> None:
        inbox = list(self._inbox)
        stamp_t = time.time_ns()
        drain(self)
        t = time.time_ns()
        for data in inbox:
            try:
                for m in envelope.decode_delivery(data).messages:
                    stamp(m.body, "gw_dispatch", stamp_t)
                    stamp(m.body, "gw_written", t)
            except Exception:
                pass

    node.Node._on_delivery = timed_on_delivery  # type: ignore[method-assign]
    node.Node._drain_inbox = timed_drain  # type: ignore[method-assign]


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: python -m bench.experiment NAME[,NAME...] -- AGORA ARGS")
    split = argv.index("--")
    names = [n for spec in argv[:split] for n in spec.split(",") if n]
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()
    from gateway.cli import main as agora

    raise SystemExit(agora(argv[split + 1 :]))


if __name__ == "__main__":
    main()
