"""Faults under steady load: what each one costs in latency, and that it loses nothing.

Each scenario runs on a fresh stack: two gateway processes, one supervised fan-out worker
(`agora fanout`), the session's PostgreSQL as physical shard #0 and a private cluster as
shard #1, a private Redis, a private broker. R conversations x M members (half the
conversations on each shard, members alternating between the gateways), one sender per
conversation, open loop at `--rate` msgs/s in all. Senders retry a send answered
`unavailable` with the same cid and body, as docs/protocol.md asks; members that lose their
connection resubscribe with `since`. After `--baseline` s of steady load the fault is
injected (always on shard #1, or on an engine every message needs), then the load goes on
for `--after` s, then the senders stop and every member must get every acked message.

    .venv/bin/python -m bench.faults                            # every scenario
    .venv/bin/python -m bench.faults --scenarios read-only,redis-restart

Per scenario: acked, lost (acked, not delivered to a member), duplicated, stored vs acked,
baseline p50, the p99 of what was delivered during the fault, and the recovery time: from
the fault's end until delivery latency (from the first send attempt) is back under
2 x baseline p50 and stays there for `--hold` s. Results in bench/results/faults.json and
the `faults` block of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.common import (
    RESULTS_DIR,
    RESULTS_MD,
    child_pids,
    command_line,
    conditions,
    cpu_sets,
    machine,
    machine_line,
    md_table,
    metric_samples,
    percentiles,
    raise_nofile,
    sample_value,
    verdict,
    wait_until,
    write_results,
)
from bench.members import Member, Sender, SubClient, create_groups
from bench.stack import LOG_DIR, BenchProc, BenchStack, bench_stack, unique_tag
from bench.wsclient import open_client
from core.settings import Settings
from storage.pools import ShardPools
from storage.shards import ShardMap
from tests.faults import (
    OwnPostgres,
    OwnRedis,
    Target,
    deadlock,
    private_shard,
    read_only_3s,
    timeout_fault,
)

NAME = "faults"
RETRYABLE = ("unavailable", "rate_limited", "timeout")
SCENARIOS = (
    "read-only",
    "statement-timeout",
    "deadlock",
    "shard-restart",
    "redis-restart",
    "broker-pause",
    "broker-stall",
    "worker-kill",
)
SHARD_DB = "agora_shard_x"  # the private shard's database (tests/faults.py)


# -- the recovery time (pure) -------------------------------------------------------------------


def recovery_s(
    samples: Sequence[tuple[float, float]],
    fault_end: float,
    threshold: float,
    hold_s: float,
    bin_s: float = 0.25,
) -> float | None:
    """Seconds from `fault_end` to the start of the first `bin_s` bin that has deliveries
    and from which every bin for `hold_s` has its median latency under `threshold` (later
    bins with no delivery are skipped: nothing was late in them). `samples` are (arrival
    time, latency). None when latency never settled in the samples given."""
    bins: dict[int, list[float]] = {}
    for at, latency in samples:
        if at >= fault_end:
            bins.setdefault(int((at - fault_end) / bin_s), []).append(latency)
    if not bins:
        return None
    last = max(bins)
    span = max(1, round(hold_s / bin_s))
    for start in sorted(bins):
        window = [bins[i] for i in range(start, start + span) if i in bins]
        if start + span - 1 > last:
            return None  # not enough samples after this to say it held
        if window and all(_median(b) < threshold for b in window):
            return round(start * bin_s, 2)
    return None


def timeline(
    samples: Sequence[tuple[float, float]], start: float, end: float, bin_s: float = 0.5
) -> list[list[float]]:
    """[seconds from `start`, deliveries, median latency ms] per `bin_s` from 2 s before
    `start` to `end`: how latency moved around the fault."""
    bins: dict[int, list[float]] = {}
    for at, latency in samples:
        if start - 2 <= at < end:
            bins.setdefault(int((at - start + 2) // bin_s), []).append(latency)
    return [
        [round(i * bin_s - 2, 2), len(v), round(_median(v), 1)] for i, v in sorted(bins.items())
    ]


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


# -- the clients ------------------------------------------------------------------------------


class TimedMember(Member):
    """A Member that keeps (arrival wall time s, latency ms) of each new seq."""

    __slots__ = ("samples",)

    def __init__(self, user: str, token: str, conv: str) -> None:
        super().__init__(user, token, conv)
        self.samples: list[tuple[float, float]] = []

    def on_msg(self, seq: int, body: str, now_ns: int) -> None:
        before = self.received
        super().on_msg(seq, body, now_ns)
        sent = body[:19]
        if self.received > before and sent.isdigit():
            self.samples.append((now_ns / 1e9, (now_ns - int(sent)) / 1e6))


@dataclass
class Outbox:
    """One sender's sends across its connections: the body of each cid not yet acked (a
    retry sends the same body, so latency counts from the first attempt), and the acks."""

    user: str
    conv: str
    bodies: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    ids: dict[str, str] = field(default_factory=dict)  # cid -> the id its ack gave
    errored: set[str] = field(default_factory=set)  # cids answered `err` at least once
    errors: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    retries: int = 0
    reconnects: int = 0


class RetryingSender(Sender):
    """A Sender that retries `unavailable`/`rate_limited` answers with the same cid after
    `retry_after_ms`; what it sends lives in its Outbox, so a new connection goes on."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        box: Outbox,
        on_gone: Callable[[RetryingSender], None],
    ) -> None:
        super().__init__(host, port, token, box.user)
        self.box = box
        self.cid_of: dict[int, str] = {}
        self._on_gone = on_gone

    def on_closed(self) -> None:
        self._on_gone(self)

    def send_cid(self, cid: str) -> None:
        rid = next(self._rids)
        self.pending[rid] = (self.box.conv, time.monotonic())
        self.cid_of[rid] = cid
        body = self.box.bodies[cid]
        self.send_json({"t": "send", "conv": self.box.conv, "cid": cid, "body": body, "rid": rid})

    def on_frame(self, payload: bytes) -> None:
        f = orjson.loads(payload)
        t = f.get("t")
        if t != "ack" and t != "err":
            return
        rid = f.get("rid", -1)
        cid = self.cid_of.pop(rid, None)
        if self.pending.pop(rid, None) is None or cid is None:
            return
        box = self.box
        if t == "ack":
            box.acked.add(cid)
            box.ids[cid] = str(f.get("id"))
            box.bodies.pop(cid, None)
            return
        code = str(f.get("code"))
        box.errors[code] += 1
        box.errored.add(cid)
        if code in RETRYABLE:
            box.retries += 1
            delay = min(2.0, max(0.05, (f.get("retry_after_ms") or 200) / 1000))
            asyncio.get_running_loop().call_later(delay, self._retry, cid)
        else:
            box.refused += 1
            box.bodies.pop(cid, None)

    def _retry(self, cid: str) -> None:
        if cid in self.box.bodies and self.is_open:
            self.send_cid(cid)


class Load:
    """The members and senders of one scenario, kept connected, and the send loop."""

    def __init__(self, gateways: Sequence[BenchProc], token: Callable[[str], str]) -> None:
        self.ports = [g.port or 0 for g in gateways]
        self.token = token
        self.members: list[TimedMember] = []
        self.senders: dict[str, RetryingSender] = {}  # user -> its current connection
        self.boxes: list[Outbox] = []
        self.member_reconnects = 0
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def connect(self, groups: Sequence[tuple[str, list[str]]], convs: Sequence[str]) -> None:
        opens = []
        for conv, (owner, users) in zip(convs, groups, strict=True):
            self.boxes.append(Outbox(owner, conv))
            for j, u in enumerate(users):
                m = TimedMember(u, self.token(u), conv)
                self.members.append(m)
                opens.append(self._member(m, j % 2, None))
        await asyncio.gather(*opens)
        await asyncio.gather(*(self._sender(box, i % 2) for i, box in enumerate(self.boxes)))

    async def _member(self, m: TimedMember, gw: int, since: int | None) -> None:
        for attempt in range(200):
            port = self.ports[(gw + attempt) % len(self.ports)]
            client = SubClient(m, "127.0.0.1", port, self._member_closed)
            try:
                await open_client(client, "127.0.0.1", port, None, 5)
                await asyncio.wait_for(client.subscribe(since), 10)
                m.client = client
                return
            except Exception:
                client.abort()
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{m.user} could not subscribe")

    def _member_closed(self, m: Member, client: SubClient) -> None:
        if self.stopping or m.client is not client:
            return
        assert isinstance(m, TimedMember)
        self.member_reconnects += 1
        self._spawn(self._member(m, 1, m.last))

    async def _sender(self, box: Outbox, gw: int) -> None:
        for attempt in range(200):
            port = self.ports[(gw + attempt) % len(self.ports)]
            s = RetryingSender("127.0.0.1", port, self.token(box.user), box, self._sender_closed)
            try:
                await open_client(s, "127.0.0.1", port, None, 5)
            except Exception:
                s.abort()
                await asyncio.sleep(0.2)
                continue
            self.senders[box.user] = s
            for cid in list(box.bodies):  # what the last connection had not got acked
                s.send_cid(cid)
            return
        raise RuntimeError(f"{box.user} could not connect")

    def _sender_closed(self, s: RetryingSender) -> None:
        if not self.stopping and self.senders.get(s.box.user) is s:
            s.box.reconnects += 1
            self._spawn(self._sender(s.box, 1))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def prime(self, timeout: float) -> None:
        """One message per conversation, waited for by every member: the worker has joined
        its group and every path is warm before anything is measured."""
        for box in self.boxes:
            box.bodies["prime"] = f"{time.time_ns()} prime"
            self.senders[box.user].send_cid("prime")
        ok = await wait_until(lambda: all(m.received >= 1 for m in self.members), timeout)
        if not ok:
            raise RuntimeError("the first messages were not delivered")

    async def send(self, rate: float, seconds: float, pad: str) -> None:
        """Open loop: `rate` sends/s over the senders, round robin, for `seconds`."""
        start = time.monotonic()
        sent = 0
        i = random.randrange(len(self.boxes))
        while (elapsed := time.monotonic() - start) < seconds:
            while sent < int(elapsed * rate):
                box = self.boxes[i % len(self.boxes)]
                cid = f"c{sent}"
                box.bodies[cid] = f"{time.time_ns()} {pad}"
                s = self.senders.get(box.user)
                if s is not None and s.is_open:
                    s.send_cid(cid)
                sent += 1
                i += 1
            await asyncio.sleep(0.002)

    def samples(self) -> list[tuple[float, float]]:
        return [x for m in self.members for x in m.samples]

    async def settle(self, timeout: float) -> dict[str, Any]:
        """Wait for every send to be acked (retries included), then for every member to
        have its conversation's acked messages; what was lost and duplicated."""
        await wait_until(lambda: not any(b.bodies for b in self.boxes), timeout)
        totals = {b.conv: len(b.acked) for b in self.boxes}
        want = sum(totals[m.conv] for m in self.members)

        def delivered() -> int:
            return sum(min(m.received, totals[m.conv]) for m in self.members)

        await wait_until(lambda: delivered() >= want, timeout)
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        return {
            "acked": sum(totals.values()),
            "unacked": sum(len(b.bodies) for b in self.boxes),
            "refused": sum(b.refused for b in self.boxes),
            "expected": want,
            "lost": want - delivered(),
            "duplicated": sum(m.dups for m in self.members),
            "reordered": sum(m.reorders for m in self.members),
            "retried_sends": sum(b.retries for b in self.boxes),
            "send_errors": dict(sum((b.errors for b in self.boxes), Counter())),
            "member_reconnects": self.member_reconnects,
            "sender_reconnects": sum(b.reconnects for b in self.boxes),
        }

    def close(self) -> None:
        self.stopping = True
        for m in self.members:
            if m.client is not None:
                m.client.abort()
        for s in self.senders.values():
            s.abort()


# -- the faults -------------------------------------------------------------------------------


@dataclass
class Scene:
    """What a fault acts on."""

    stack: BenchStack
    pg: OwnPostgres
    redis: OwnRedis
    worker: BenchProc
    shard1_convs: list[int]
    worker_log: Callable[[], str]


async def _db_fault(scene: Scene, fault: Callable[[Target], Awaitable[None]]) -> None:
    dsn = scene.pg.dsn(SHARD_DB)
    admin = await asyncpg.connect(dsn)
    try:
        await fault(Target(admin, dsn, SHARD_DB, scene.shard1_convs, scene.worker_log))
    finally:
        await admin.close()


async def _shard_restart(scene: Scene) -> None:
    await asyncio.to_thread(scene.pg.stop, "fast")
    await asyncio.sleep(3)
    await asyncio.to_thread(scene.pg.start)


async def _redis_restart(scene: Scene) -> None:
    scene.redis.kill()  # SIGKILL, no persistence: it comes back empty
    await asyncio.sleep(1)
    await asyncio.to_thread(scene.redis.start)


async def _broker_pause(scene: Scene) -> None:
    broker = scene.stack.broker
    assert broker is not None
    broker.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(3)
    finally:
        broker.send_signal(signal.SIGCONT)


async def _broker_stall(scene: Scene) -> None:
    """Longer than the produce line's request timeout and aiokafka's (5 s each): the line
    hands its records in flight and queued to aiokafka (gateway/produceline.py), whose own
    request times out and is retried, and the line's degraded window ends while the broker
    is still stopped."""
    broker = scene.stack.broker
    assert broker is not None
    # aiokafka logs at ERROR each failed attempt to reach the stopped broker (past its
    # request timeout): that is this fault (bench_stack fails a run on an undeclared one).
    for proc in scene.stack.procs:
        proc.expect_log(r"^aiokafka: Unable (connect to node|to update metadata)")
    broker.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(12)
    finally:
        broker.send_signal(signal.SIGCONT)


async def _worker_kill(scene: Scene) -> None:
    """SIGKILL the supervised worker process; the fault ends when its supervisor has
    started the next one."""
    # The supervisor logs the killed child's exit at ERROR: that is this fault, not a
    # failure of the run (bench_stack fails a run on an undeclared ERROR line).
    scene.worker.expect_log(r"^agora\.supervisor: fanout worker \d+ \(pid \d+\) exited with -9")
    supervisor = scene.worker.popen.pid
    before = child_pids(supervisor)
    assert before, "the supervisor has no worker process"
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    ok = await wait_until(
        lambda: bool(set(child_pids(supervisor)) - set(before)), 30, interval=0.02
    )
    assert ok, "the supervisor did not start a new worker"


FAULTS: dict[str, Callable[[Scene], Awaitable[None]]] = {
    "read-only": lambda s: _db_fault(s, read_only_3s),
    "statement-timeout": lambda s: _db_fault(s, timeout_fault("statement_timeout")),
    "deadlock": lambda s: _db_fault(s, deadlock),
    "shard-restart": _shard_restart,
    "redis-restart": _redis_restart,
    "broker-pause": _broker_pause,
    "broker-stall": _broker_stall,
    "worker-kill": _worker_kill,
}
WHAT = {
    "read-only": "shard #1 read-only 3 s (ALTER DATABASE ... default_transaction_read_only)",
    "statement-timeout": "shard #1 statement_timeout 300 ms, a row lock held 3 s",
    "deadlock": "a deadlock forced on the worker's transaction (40P01)",
    "shard-restart": "shard #1's PostgreSQL: pg_ctl stop -m fast, 3 s, start",
    "redis-restart": "Redis SIGKILL, 1 s, started empty on the same port",
    "broker-pause": "broker SIGSTOP 3 s, SIGCONT",
    "broker-stall": "broker SIGSTOP 12 s (past the produce line's and aiokafka's 5 s timeouts)",
    "worker-kill": "the fan-out worker process SIGKILL (its supervisor restarts it)",
}


# -- one scenario -----------------------------------------------------------------------------


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    gw_cpus, _ = cpu_sets()
    redis = OwnRedis()
    redis.start()
    try:
        with bench_stack(gw_cpus) as stack, private_shard(stack.settings) as (two, pg):
            stack.settings = two.with_overrides(
                redis_url=redis.url, kafka_produce_line=args.produce_line
            )
            tag = unique_tag()
            a, b = stack.gateway(f"fl-a-{tag}"), stack.gateway(f"fl-b-{tag}")
            worker_name = f"fl-f-{tag}"
            worker = stack.fanout(worker_name)
            path = LOG_DIR / f"{worker_name}.log"

            def worker_log() -> str:
                return path.read_text(errors="replace")

            result: dict[str, Any] = uvloop.run(
                _scenario(name, args, stack, [a, b], pg, redis, worker, worker_log, tag)
            )
            log = worker_log()
            result["worker_alive"] = worker.alive()
            result["worker_traceback"] = "Traceback" in log
            result["worker_restarts"] = log.count("exited with")
            result["gateways_alive"] = a.alive() and b.alive()
            return result
    finally:
        redis.kill()


async def _scenario(
    name: str,
    args: argparse.Namespace,
    stack: BenchStack,
    gateways: list[BenchProc],
    pg: OwnPostgres,
    redis: OwnRedis,
    worker: BenchProc,
    worker_log: Callable[[], str],
    tag: str,
) -> dict[str, Any]:
    shards = ShardMap.from_settings(stack.settings)
    groups = []
    for c in range(args.convs):
        # The owner (who sends) picks the shard: conversations alternate between #0 and #1.
        owner = next(u for k in range(10_000) if shards.for_user(u := f"fl{tag}-{c}-o{k}") == c % 2)
        groups.append((owner, [owner] + [f"fl{tag}-{c}-{j}" for j in range(1, args.members)]))
    convs = await asyncio.to_thread(create_groups, gateways[0].http_url, stack.token, groups)
    shard1 = [int(c) for c in convs if shards.for_id(int(c)) == 1]
    assert shard1, "no conversation on shard #1"
    load = Load(gateways, stack.token)
    await load.connect(groups, convs)
    await load.prime(60)
    pad = "x" * args.body_bytes
    total = args.warmup + args.baseline + args.after
    sending = asyncio.ensure_future(load.send(args.rate, total + 600, pad))
    scene = Scene(stack, pg, redis, worker, shard1, worker_log)
    try:
        await asyncio.sleep(args.warmup)
        base_from = time.time()
        await asyncio.sleep(args.baseline)
        fault_start = time.time()
        await FAULTS[name](scene)
        fault_end = time.time()
        await asyncio.sleep(args.after)
    finally:
        sending.cancel()
    outcome = await load.settle(args.settle)
    stored = await _stored(stack.settings, load.boxes)
    line = await asyncio.to_thread(_line_counts, gateways)
    load.close()
    samples = load.samples()
    baseline = percentiles([ms for at, ms in samples if base_from <= at < fault_start])
    during = [ms for at, ms in samples if fault_start <= at <= fault_end]
    threshold = 2 * baseline["p50"]
    recovery = recovery_s(samples, fault_end, threshold, args.hold)
    until = fault_end + (recovery if recovery is not None else args.after)
    after_fault = [ms for at, ms in samples if fault_start <= at <= until]
    row = {
        "scenario": name,
        "fault": WHAT[name],
        "fault_s": round(fault_end - fault_start, 2),
        **outcome,
        **stored,
        "stored_matches_acked": stored["stored"] == outcome["acked"] and not stored["id_mismatch"],
        "produce_line": line,
        "baseline_ms": baseline,
        "during_ms": percentiles(during),
        "until_recovered_ms": percentiles(after_fault),
        "recovery_threshold_ms": round(threshold, 2),
        "recovery_s": recovery,
        "loadavg_1m": round(os.getloadavg()[0], 2),  # others share the machine
        "timeline": timeline(samples, fault_start, fault_end + args.after),
    }
    print(_line(row), flush=True)
    return row


async def _stored(settings: Settings, boxes: Sequence[Outbox]) -> dict[str, Any]:
    """What the shards hold against what was acked: the count, acked ids that are not the
    stored row's, rows never acked, and each conversation's order (its one sender's cids
    `c<n>` numbered in send order) by seq: an inversion is a message stored after one sent
    later. With sends handled one at a time per connection (the default), a send acked at
    its first attempt must precede every later send; one answered `err` first may be
    stored later than sends after it (docs/protocol.md: `unavailable` may be stored late)."""
    pools = ShardPools(settings)
    out: dict[str, Any] = {
        "stored": 0,
        "id_mismatch": 0,
        "stored_unacked": 0,
        "inversions_first_try": 0,
        "inversions_retried": 0,
    }
    examples: list[str] = []
    try:
        for box in boxes:
            conv = int(box.conv)
            async with pools.connection(pools.for_id(conv)) as conn:
                rows = await conn.fetch(
                    "SELECT seq, id, cid FROM messages WHERE conv_id = $1 ORDER BY seq", conv
                )
            out["stored"] += len(rows)
            by_cid = {r["cid"]: str(r["id"]) for r in rows}
            for cid, acked_id in box.ids.items():
                if by_cid.get(cid) != acked_id:
                    out["id_mismatch"] += 1
                    if len(examples) < 5:
                        examples.append(
                            f"{box.conv}/{cid}: acked {acked_id}, stored {by_cid.get(cid)}"
                        )
            out["stored_unacked"] += sum(1 for cid in by_cid if cid not in box.acked)
            highest = -1
            for r in rows:
                cid = r["cid"]
                if not (cid.startswith("c") and cid[1:].isdigit()):
                    continue
                n = int(cid[1:])
                if n < highest:
                    kind = "inversions_retried" if cid in box.errored else "inversions_first_try"
                    out[kind] += 1
                    if len(examples) < 5:
                        examples.append(f"{box.conv}: {cid} (seq {r['seq']}) after c{highest}")
                highest = max(highest, n)
    finally:
        await pools.close()
    out["examples"] = examples
    return out


def _line_counts(gateways: Sequence[BenchProc]) -> dict[str, float]:
    """The gateways' produce line counters (gateway/metrics.py), summed."""
    out: dict[str, float] = {}
    for g in gateways:
        for line in metric_samples(f"{g.http_url}/metrics", ("agora_produce_line_",)) or ():
            name = line.split(" ", 1)[0].split("{", 1)[0].removeprefix("agora_produce_line_")
            out[name] = out.get(name, 0.0) + sample_value(line)
    return out


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['scenario']}: acked {r['acked']}, lost {r['lost']}, duplicated {r['duplicated']}, "
        f"stored {r['stored']}, ids not the stored one {r['id_mismatch']}, inversions "
        f"{r['inversions_first_try']} first-try/{r['inversions_retried']} retried, handed over "
        f"{r['produce_line'].get('handed_over_total', 0):g}; p50 {r['baseline_ms']['p50']} ms "
        f"before, p99 "
        f"{r['during_ms']['p99']} ms during; recovered {r['recovery_s']} s after the fault"
    )


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    started = conditions()
    rows = [run_scenario(name, args) for name in args.scenarios]
    lost = sum(r["lost"] for r in rows)
    dup = sum(r["duplicated"] for r in rows)
    targets = {
        "lost": {"value": lost, "target": "0 acked messages lost", "reached": lost == 0},
        "duplicated": {"value": dup, "target": "0 messages duplicated", "reached": dup == 0},
        "stored_once": {
            "value": all(r["stored_matches_acked"] for r in rows),
            "target": "every acked message stored once, under its acked id",
            "reached": all(r["stored_matches_acked"] for r in rows),
        },
        "in_order": {
            "value": sum(r["inversions_first_try"] for r in rows),
            "target": "a sender's messages acked at the first attempt stored in send order",
            "reached": all(r["inversions_first_try"] == 0 for r in rows),
        },
        "processes_alive": {
            "value": all(r["worker_alive"] and r["gateways_alive"] for r in rows),
            "target": "no worker or gateway exits",
            "reached": all(r["worker_alive"] and r["gateways_alive"] for r in rows),
        },
    }
    return {
        "bench": NAME,
        "command": command_line(),
        "machine": machine(),
        "conditions": started,
        "params": {
            k: vars(args)[k]
            for k in (
                "rate",
                "convs",
                "members",
                "warmup",
                "baseline",
                "after",
                "hold",
                "produce_line",
            )
        },
        "summary": {
            "acked": sum(r["acked"] for r in rows),
            "lost": lost,
            "duplicated": dup,
            "recovery_s": {r["scenario"]: r["recovery_s"] for r in rows},
        },
        "targets": targets,
        "scenarios": rows,
    }


def render(data: dict[str, Any]) -> str:
    p = data["params"]
    rows = [
        [
            r["scenario"],
            r["fault_s"],
            r["acked"],
            r["lost"],
            r["duplicated"],
            f"{r['stored']}",
            r["id_mismatch"],
            f"{r['inversions_first_try']} / {r['inversions_retried']}",
            f"{r['produce_line'].get('handed_over_total', 0):g}",
            r["retried_sends"],
            r["baseline_ms"]["p50"],
            r["during_ms"]["p99"] if r["during_ms"]["count"] else "none delivered",
            r["until_recovered_ms"]["p99"],
            r["until_recovered_ms"]["max"],
            "—" if r["recovery_s"] is None else r["recovery_s"],
        ]
        for r in data["scenarios"]
    ]
    t = data["targets"]
    return "\n".join(
        [
            "## Faults under steady load (`bench.faults`)",
            "",
            f"`{data['command']}` — {machine_line(data['machine'], data['conditions'])}.",
            "",
            f"{p['rate']:g} msgs/s, {p['convs']} conversations x {p['members']} members "
            "(half on shard #0, half on a private PostgreSQL as shard #1), two gateways, one "
            f"supervised fan-out worker; {p['baseline']:g} s of baseline, the fault, then "
            f"{p['after']:g} s more. Latency is end to end, from a message's first send attempt "
            "(a send answered `unavailable` is retried with the same cid). Recovery: from the "
            f"fault's end until the median latency of every 250 ms for {p['hold']:g} s is under "
            "2 x the baseline p50.",
            "",
            md_table(
                [
                    "fault",
                    "fault s",
                    "acked",
                    "lost",
                    "duplicated",
                    "stored",
                    "acked id not stored one",
                    "inversions first-try / retried",
                    "line handed over",
                    "sends retried",
                    "baseline p50 ms",
                    "p99 during ms",
                    "p99 fault → recovered ms",
                    "max fault → recovered ms",
                    "recovery s",
                ],
                rows,
            ),
            "",
            "\n".join(f"- `{r['scenario']}`: {r['fault']}" for r in data["scenarios"]),
            "",
            f"Nothing lost: {verdict(t['lost']['reached'])}; nothing duplicated: "
            f"{verdict(t['duplicated']['reached'])}; stored once: "
            f"{verdict(t['stored_once']['reached'])}; in send order: "
            f"{verdict(t['in_order']['reached'])}; no process died: "
            f"{verdict(t['processes_alive']['reached'])}.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    p.add_argument("--rate", type=float, default=100.0, help="total msgs/s")
    p.add_argument("--convs", type=int, default=10)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured s before baseline")
    p.add_argument("--baseline", type=float, default=10.0, help="s of load before the fault")
    p.add_argument("--after", type=float, default=15.0, help="s of load after the fault")
    p.add_argument("--hold", type=float, default=2.0, help="s latency must stay recovered")
    p.add_argument("--settle", type=float, default=90.0, help="s to wait for acks, deliveries")
    p.add_argument("--body-bytes", type=int, default=100)
    p.add_argument(
        "--no-produce-line",
        dest="produce_line",
        action="store_false",
        help="the gateways produce through aiokafka (AGORA_KAFKA_PRODUCE_LINE=false; the "
        "bench's settings do not come from the environment)",
    )
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--results-md", default=str(RESULTS_MD))
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in FAULTS]
    if unknown or not args.scenarios:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.convs < 2 or args.members < 1 or args.rate <= 0:
        p.error("--convs must be at least 2 (one per shard), --members and --rate positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = run(args)
    md = Path(args.results_md) if args.results_md else None
    path = write_results(NAME, data, render(data), Path(args.out), md)
    print(
        f"{NAME}: lost {data['summary']['lost']}, "
        f"recovery {data['summary']['recovery_s']} -> {path}"
    )
    return data


if __name__ == "__main__":
    main()
