"""Soak: a steady load for a long time, measured minute by minute.

R conversations x M members over two gateway processes, S senders at a fixed total rate,
one fan-out worker (the shape of `bench.fanout`), for `--minutes`. Per interval (a minute
by default): acked sends, deliveries, end-to-end latency p50/p99, deliveries lost (known
at the end: each acked message is attributed to the interval it was sent in), the RSS
and CPU of every process (both gateways, the fan-out worker, the broker, Redis,
PostgreSQL, the load generator), Redis used_memory and key count, the load average; and
the least-squares slope per minute of each after the warm-up.

    .venv/bin/python -m bench.soak                 # 30 minutes at 200 msgs/s
    .venv/bin/python -m bench.soak --minutes 10

At the end the senders stop, every member must have every acked message of its
conversation (after `--drain` s at most); a lost one is looked up in the shard: stored but
not delivered (routing, gateway) or acked and never stored (broker, fan-out worker).
PostgreSQL is counted as its postmaster plus all its children (backends, checkpointer,
WAL writer...), memory as their summed PSS (their RSS would count shared_buffers once per
backend); every other process by its RSS. Run it with a private PostgreSQL and Redis
(`AGORA_TEST_PG`, `AGORA_TEST_REDIS`): on shared ones, other sessions' backends and keys
are counted too.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    RESULTS_DIR,
    RESULTS_MD,
    SOURCE_IPS,
    command_line,
    conditions,
    cpu_sets,
    machine,
    machine_line,
    md_table,
    metric_samples,
    percentiles,
    pin,
    raise_nofile,
    slope,
    verdict,
    wait_until,
    write_results,
)
from bench.fanout import FanoutWorker, _plan_conversations
from bench.loadgen import WorkerPool, split
from bench.members import Member, Sender, seq_report
from bench.profile import Profiler
from bench.profile import render as render_profile
from bench.stack import BenchProc, BenchStack, bench_stack, unique_tag
from bench.watch import (
    BrokerLog,
    machine_busy_s,
    redis_breakdown,
    redis_reading,
    stored_total,
    watch_list,
)
from core.settings import Settings
from fanout.kafka import fanout_group
from storage import messages
from storage.pools import ShardPools

NAME = "soak"
MAX_SAMPLES = 100_000  # latency samples per worker per interval (a uniform sample beyond)
FLAT_SHARE = 0.05  # "flat": growth over the measured span under 5 % of the level...
FLAT_MIB = 2.0  # ...or under 2 MiB, whichever is larger
P99_TOLERANCE = 0.20


class SoakSender(Sender):
    """A Sender that also keeps the cid of every acked send, with its conversation."""

    def __init__(self, host: str, port: int, token: str, user: str) -> None:
        super().__init__(host, port, token, user)
        self.acked_cids: list[tuple[str, str]] = []

    def on_frame(self, payload: bytes) -> None:
        f = orjson.loads(payload)
        if f.get("t") == "ack":
            entry = self.pending.get(f.get("rid", -1))
            if entry is not None:
                self.acked_cids.append((entry[0], str(f.get("cid"))))
        super().on_frame(payload)


class SoakWorker(FanoutWorker):
    """A load-generator process: members and senders of `bench.fanout`, one send loop for
    the whole run, and a reading of what happened since the last one on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def prepare(
        self,
        members: list[tuple[str, str, int]],
        senders: list[tuple[str, str, int]],
        secret: str,
        ips: list[str],
    ) -> int:
        from gateway.auth import make_token

        tokens: dict[str, str] = {}

        def token(u: str) -> str:
            if u not in tokens:
                tokens[u] = make_token(secret, u, None, 24 * 3600)
            return tokens[u]

        self.members = [(Member(u, token(u), c), p) for u, c, p in members]
        self.senders = [(SoakSender("127.0.0.1", p, token(u), u), c, p) for u, c, p in senders]
        self.ips = ips
        return len(self.members)

    async def start(
        self,
        worker: int,
        t0: float,
        interval: float,
        rate: float,
        seconds: float,
        pad: str,
        phase: str = "",
    ) -> None:
        """Send at `rate` for `seconds`; each cid names its interval since `t0` (or
        `phase`, for the warm-up)."""
        for m, _ in self.members:
            m.latencies = []
            m.record = True
        self._send_task = asyncio.get_running_loop().create_task(
            self._soak_loop(worker, t0, interval, rate, seconds, pad, phase)
        )

    async def _soak_loop(
        self,
        worker: int,
        t0: float,
        interval: float,
        rate: float,
        seconds: float,
        pad: str,
        phase: str,
    ) -> None:
        senders = self.senders
        if not senders or rate <= 0:
            return
        start = time.monotonic()
        sent = 0
        i = random.randrange(len(senders))
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            due = int((now - start) * rate)
            # The cid carries the interval it was sent in (CLOCK_MONOTONIC is one clock for
            # every process), so a loss found at the end is charged to its interval.
            k = phase or str(int((now - t0) / interval))
            while sent < due:
                s, conv, _ = senders[i % len(senders)]
                s.send_msg(conv, f"{k}.{worker}.{self.sent}", pad)
                self.sent_by_conv[conv] += 1
                self.sent += 1
                sent += 1
                i += 1
            await asyncio.sleep(0.002)

    async def wait_sent(self) -> None:
        if self._send_task is not None:
            await self._send_task

    async def sample(self) -> dict[str, Any]:
        """What happened since the last call: latencies, ack times; totals so far."""
        latencies: list[int] = []
        for m, _ in self.members:
            latencies += m.latencies
            m.latencies = []
        deliveries = len(latencies)
        if len(latencies) > MAX_SAMPLES:
            latencies = random.sample(latencies, MAX_SAMPLES)
        ack_ms: list[float] = []
        errors: Counter[str] = Counter()
        acked = 0
        for s, _, _ in self.senders:
            ack_ms += s.ack_ms
            s.ack_ms = []
            errors.update(s.errors)
            acked += sum(s.acked.values())
        return {
            "latencies_us": latencies,
            "deliveries": deliveries,
            "ack_ms": ack_ms,
            "sent": self.sent,
            "acked": acked,
            "errors": dict(errors),
            "unacked": sum(len(s.pending) for s, _, _ in self.senders),
            "closed": sum(1 for m, _ in self.members if m.client is None or not m.client.is_open),
        }

    async def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the send loop to end and for its acks; every acked (conv, cid)."""
        if self._send_task is not None:
            await self._send_task
        await wait_until(lambda: not any(s.pending for s, _, _ in self.senders), timeout)
        acked: Counter[str] = Counter()
        cids: list[tuple[str, str]] = []
        for s, _, _ in self.senders:
            acked.update(s.acked)
            assert isinstance(s, SoakSender)
            cids += s.acked_cids
        return {
            "acked": dict(acked),
            "acked_cids": cids,
            "unacked": sum(len(s.pending) for s, _, _ in self.senders),
        }

    async def drain(self, totals: dict[str, int], stall: float, cap: float) -> dict[str, Any]:
        """Wait until every member has its conversation's acked total, or until nothing
        more arrived for `stall` s, or `cap` s in all: a backlog still moving is waited
        for, so "lost" means stopped. Then the seqs each member is missing."""
        members = [m for m, _ in self.members]
        want = sum(totals.get(m.conv, 0) for m in members)
        t0 = last_progress = time.monotonic()
        have = -1
        while True:
            now = time.monotonic()
            got = sum(min(m.received, totals.get(m.conv, 0)) for m in members)
            if got >= want:
                break
            if got > have:
                have, last_progress = got, now
            if now - last_progress >= stall or now - t0 >= cap:
                break
            await asyncio.sleep(0.2)
        drain_s = time.monotonic() - t0
        for m in members:
            m.record = False
        missing = []
        for m in members:
            total = totals.get(m.conv, 0)
            if m.received < total:
                holes = [s for s in range(m.last + 1, total + 1) if s not in m.ahead]
                missing.append((m.conv, m.user, holes))
        errors: Counter[str] = Counter()
        for m in members:
            errors.update(m.errors)
        return {
            **seq_report(members, totals),
            "missing": missing,
            "drain_s": round(drain_s, 2),
            "closed": sum(1 for m in members if m.client is None or not m.client.is_open),
            "frame_errors": dict(errors),
        }


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    raise_nofile()
    gw_cpus, lg_cpus = cpu_sets()
    clients = args.convs * args.members
    procs = args.procs or max(1, min(4, math.ceil(clients / 4000)))
    with bench_stack(gw_cpus) as stack:
        tag = unique_tag()
        a = stack.gateway(f"soak-a-{tag}")
        b = stack.gateway(f"soak-b-{tag}")
        for i in range(args.fanout_workers):
            stack.fanout(f"soak-f{i}-{tag}")
        pin(lg_cpus)
        pool = WorkerPool("bench.soak:SoakWorker", procs, lg_cpus)
        try:
            return uvloop.run(_measure(args, stack, a, b, pool, tag))
        finally:
            pool.close()


async def _measure(
    args: argparse.Namespace,
    stack: BenchStack,
    a: BenchProc,
    b: BenchProc,
    pool: WorkerPool,
    tag: str,
) -> dict[str, Any]:
    members, senders, shape = await asyncio.to_thread(_plan_conversations, args, stack, a, b, tag)
    ips = list(SOURCE_IPS[: args.source_ips])
    member_parts = split(members, pool.size)
    sender_parts = split(senders, pool.size)
    await pool.call(
        "prepare",
        [
            {"members": mp, "senders": sp, "secret": stack.settings.jwt_secret, "ips": ips}
            for mp, sp in zip(member_parts, sender_parts, strict=True)
        ],
    )
    parts = await pool.call("connect", {"inflight": max(1, 200 // pool.size), "timeout": 60})
    connect_failures: Counter[str] = Counter()
    for p in parts:
        connect_failures.update(p["failures"])
    subbed = sum(p["subbed"] for p in parts)
    conv_members: Counter[str] = Counter(c for _, c, _ in members)
    pad = "x" * max(0, args.body_bytes - 20)
    watched = await watch_list(stack, pool.pids)
    broker_log = BrokerLog(stack.settings)
    await broker_log.start()
    pools = ShardPools(stack.settings)
    convs = sorted(conv_members)
    cond = conditions()
    interval = float(args.interval)
    seconds = args.minutes * 60.0
    n_rows = max(1, math.ceil(seconds / interval - 1e-9))
    window_rows = max(1, round(min(5.0, args.minutes / 2) * 60 / interval))
    first_window: list[float] = []
    last_window: deque[list[float]] = deque(maxlen=window_rows)
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    profilers: list[tuple[str, Profiler]] = []
    fanout_pids = [p.pid for p in stack.procs if p.name.startswith("soak-f")]

    # Warm-up, not measured: the first messages pay for the consumer group's join and the
    # caches (seconds of latency), which would otherwise stand for the first minute.
    if args.warmup_s > 0:
        await pool.call(
            "start",
            [
                {
                    "worker": w,
                    "t0": time.monotonic(),
                    "interval": interval,
                    "rate": args.rate * len(sp) / max(1, len(senders)),
                    "seconds": args.warmup_s,
                    "pad": pad,
                    "phase": "w",
                }
                for w, sp in enumerate(sender_parts)
            ],
        )
        await pool.call("wait_sent")
        await asyncio.sleep(2.0)
        await pool.call("sample")
    for w in watched:
        w.read(1.0)  # the baseline of each CPU reading
    busy_prev = machine_busy_s()
    base = await pool.call("sample")
    prev_sent = sum(s["sent"] for s in base)
    prev_acked = sum(s["acked"] for s in base)
    t0 = time.monotonic()
    await pool.call(
        "start",
        [
            {
                "worker": w,
                "t0": t0,
                "interval": interval,
                "rate": args.rate * len(sp) / max(1, len(senders)),
                "seconds": seconds,
                "pad": pad,
            }
            for w, sp in enumerate(sender_parts)
        ],
    )
    t_prev = t0
    for k in range(n_rows):
        end = t0 + min(seconds, (k + 1) * interval)
        if args.profile and k == n_rows - 1:
            out_dir = Path(args.out)
            profilers = [
                ("gateway A", Profiler(a.pid, out_dir / "soak-gateway-profile.txt").start()),
                *[
                    (f"fan-out worker {i}", Profiler(p, out_dir / f"soak-fanout{i}-profile.txt"))
                    for i, p in enumerate(fanout_pids)
                ],
            ]
            for _, prof in profilers[1:]:
                prof.start()
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        now = time.monotonic()
        took = now - t_prev
        t_prev = now
        samples = await pool.call("sample")
        procs_now = {w.label: w.read(took) for w in watched}
        busy = machine_busy_s()
        machine_cores = (busy - busy_prev) / took
        busy_prev = busy
        redis_now = await redis_reading(stack.settings)
        log_records = await broker_log.records()
        stored = await stored_total(pools, convs)
        latencies_ms = [x / 1000 for s in samples for x in s["latencies_us"]]
        lat = percentiles(latencies_ms)
        ack = percentiles([x for s in samples for x in s["ack_ms"]])
        sent = sum(s["sent"] for s in samples)
        acked = sum(s["acked"] for s in samples)
        errors: Counter[str] = Counter()
        for s in samples:
            errors.update(s["errors"])
        row = {
            "minute": round((end - t0) / 60, 2),
            "sent": sent - prev_sent,
            "acked": acked - prev_acked,
            "send_errors_total": dict(errors),
            "unacked_now": sum(s["unacked"] for s in samples),
            "deliveries": sum(s["deliveries"] for s in samples),
            "latency_ms": lat,
            "ack_ms": ack,
            "lost": 0,  # filled in after the drain
            "closed_members": sum(s["closed"] for s in samples),
            "procs": procs_now,
            "redis": redis_now,
            "broker_log_records": log_records,
            # Acked but not yet in a shard: the backlog of the broker and the fan-out worker.
            "backlog": acked - stored,
            "load1": round(os.getloadavg()[0], 2),
            # Cores busy on the whole machine, and the share not ours (other sessions).
            "machine_cores": round(machine_cores, 2),
            "others_cores": round(
                max(0.0, machine_cores - sum(p["cpu"] for p in procs_now.values())), 2
            ),
        }
        prev_sent, prev_acked = sent, acked
        rows.append(row)
        if row["minute"] <= window_rows * interval / 60 + 1e-9:
            first_window += latencies_ms
        last_window.append(latencies_ms)
        print(_progress(row), flush=True)
    for label, prof in profilers:
        profiles[label] = prof.stop()
    await pools.close()

    fin = await pool.call("finish", {"timeout": 30.0})
    totals: Counter[str] = Counter()
    acked_cids: list[tuple[str, str]] = []
    for f in fin:
        totals.update(f["acked"])
        acked_cids += f["acked_cids"]
    got = await pool.call(
        "drain", {"totals": dict(totals), "stall": args.drain, "cap": args.drain_cap}
    )
    report: Counter[str] = Counter()
    missing: list[tuple[str, str, list[int]]] = []
    for g in got:
        for key in ("expected", "delivered", "lost", "duplicated", "reordered", "beyond_acked"):
            report[key] += g[key]
        missing += [(str(c), str(u), [int(x) for x in seqs]) for c, u, seqs in g["missing"]]
    losses = await _losses(stack.settings, missing, acked_cids, totals, conv_members)
    # Where the unstored ones are: still in the log past what the worker committed
    # (not fetched, or held), or committed past (taken and dropped).
    losses["partitions"] = await broker_log.partitions(fanout_group(stack.settings))
    losses["worker_metrics"] = [
        _worker_metrics(p) for p in stack.procs if p.name.startswith("soak-f")
    ]
    await broker_log.stop()
    for k_str, n in losses["by_interval"].items():
        if k_str.isdigit() and int(k_str) < len(rows):
            rows[int(k_str)]["lost"] = n
    redis_end = await redis_breakdown(stack.settings)
    await pool.call("close")

    summary = {
        "shape": shape,
        "members": len(members),
        "subscribed": subbed,
        "senders": len(senders),
        "connect_failures": dict(connect_failures),
        "minutes": args.minutes,
        "rate": args.rate,
        "acked": sum(totals.values()),
        "unacked": sum(f["unacked"] for f in fin),
        "expected": report["expected"],
        "delivered": report["delivered"],
        "lost": report["lost"],
        "lost_stored": losses["stored"],
        "lost_never_stored": losses["never_stored"],
        "lost_in_warmup": losses["by_interval"].get("w", 0),
        "messages_never_stored": losses["messages_never_stored"],
        "duplicated": report["duplicated"],
        "reordered": report["reordered"],
        "drain_s": max(g["drain_s"] for g in got),
        "closed_members": sum(g["closed"] for g in got),
        "frame_errors": dict(sum((Counter(g["frame_errors"]) for g in got), Counter())),
        "p99_first_ms": percentiles(first_window)["p99"],
        "p99_last_ms": percentiles([x for r in last_window for x in r])["p99"],
        "window_minutes": round(window_rows * interval / 60, 2),
        "load1_mean": round(sum(r["load1"] for r in rows) / len(rows), 2),
        "others_cores_mean": round(sum(r["others_cores"] for r in rows) / len(rows), 2),
    }
    slopes = _slopes(rows, args.warmup_minutes)
    targets = _targets(summary, slopes, rows, args.warmup_minutes)
    return {
        "bench": NAME,
        "command": command_line(),
        "machine": machine(),
        "conditions": cond,
        "conditions_end": conditions(),
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "results_md")},
        "summary": summary,
        "rows": rows,
        "slopes": slopes,
        "targets": targets,
        "losses": losses,
        "redis_keys": redis_end,
        "profiles": profiles,
    }


def _progress(row: dict[str, Any]) -> str:
    procs = ", ".join(
        f"{label} {p['rss_mib']:.0f} MiB {p['cpu']:.2f} ({p['wait']:.2f})"
        for label, p in row["procs"].items()
    )
    return (
        f"  {row['minute']:6.2f} min: acked {row['acked']}, deliveries {row['deliveries']}, "
        f"p50 {row['latency_ms']['p50']} ms, p99 {row['latency_ms']['p99']} ms, redis "
        f"{row['redis']['used_memory_mib']} MiB / {row['redis']['keys']} keys, broker log "
        f"{row['broker_log_records']}, backlog {row['backlog']}, load {row['load1']}, "
        f"others {row['others_cores']}; {procs}"
    )


def _worker_metrics(proc: BenchProc) -> list[str]:
    """A worker's consumer lines of /metrics (lag and held records per partition, hold
    faults, skips healed...), as they are."""
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    lines = metric_samples(url, ("agora_consumer", "agora_worker"))
    return lines if lines is not None else [f"{url}: not readable"]


async def _losses(
    settings: Settings,
    missing: Sequence[tuple[str, str, list[int]]],
    acked_cids: Sequence[tuple[str, str]],
    totals: dict[str, int],
    conv_members: dict[str, int],
) -> dict[str, Any]:
    """Every (member, acked message) not delivered, looked up in the shard."""
    acked_by_conv: dict[str, set[str]] = defaultdict(set)
    for conv, cid in acked_cids:
        acked_by_conv[conv].add(cid)
    convs = sorted({conv for conv, _, _ in missing})
    if not convs:
        return classify_losses({}, {}, missing, conv_members)
    pools = ShardPools(settings)
    stored: dict[str, dict[int, str]] = {}
    try:
        for conv in convs:
            rows: dict[int, str] = {}
            since = 0
            for _ in range(10_000):  # bounded: 1,000 rows a page
                page = await messages.after(pools, int(conv), since, 1000)
                if not page:
                    break
                rows.update({m.seq: m.cid for m in page})
                since = page[-1].seq
            stored[conv] = rows
    finally:
        await pools.close()
    return classify_losses(
        stored, {c: acked_by_conv[c] for c in convs}, missing, conv_members, totals
    )


def classify_losses(
    stored: dict[str, dict[int, str]],
    acked: dict[str, set[str]],
    missing: Sequence[tuple[str, str, list[int]]],
    conv_members: dict[str, int],
    totals: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Split the missing deliveries into: stored but not delivered (seq in the shard, its
    cid acked), and acked but never stored (an acked cid with no row: every member of the
    conversation misses it). Each is charged to the interval its cid names ("k.w.n")."""
    by_interval: Counter[str] = Counter()
    stored_lost = 0
    unacked_gaps = 0
    for conv, _user, seqs in missing:
        rows = stored.get(conv, {})
        for seq in seqs:
            cid = rows.get(seq)
            if cid is not None and cid in acked.get(conv, set()):
                stored_lost += 1
                by_interval[cid.split(".", 1)[0]] += 1
            else:
                unacked_gaps += 1  # a seq the member lacks whose row is not an acked cid
    never: list[tuple[str, str]] = []
    for conv, cids in acked.items():
        have = set(stored.get(conv, {}).values())
        for cid in sorted(cids - have):
            never.append((conv, cid))
            by_interval[cid.split(".", 1)[0]] += conv_members.get(conv, 0)
    return {
        "stored": stored_lost,
        "never_stored": sum(conv_members.get(c, 0) for c, _ in never),
        "messages_never_stored": len(never),
        "never_stored_cids": never[:50],
        "other_gaps": unacked_gaps,
        "by_interval": dict(by_interval),
        "acked_vs_stored": {
            c: [len(acked[c]), len(stored.get(c, {})), (totals or {}).get(c, 0)] for c in acked
        },
    }


# -- slopes and targets -------------------------------------------------------------------------


def series(rows: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Every per-interval number worth a slope, by name."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        out["p50 ms"].append(r["latency_ms"]["p50"])
        out["p99 ms"].append(r["latency_ms"]["p99"])
        out["lost"].append(float(r["lost"]))
        out["redis used MiB"].append(r["redis"]["used_memory_mib"])
        out["redis keys"].append(float(r["redis"]["keys"]))
        out["broker log records"].append(float(r["broker_log_records"]))
        out["backlog"].append(float(r.get("backlog", 0)))
        for label, p in r["procs"].items():
            out[f"{label} MiB"].append(p["rss_mib"])
            out[f"{label} CPU"].append(p["cpu"])
    return dict(out)


def measured_rows(rows: Sequence[dict[str, Any]], warmup_minutes: float) -> list[dict[str, Any]]:
    """The rows after the warm-up (all of them when fewer than two would remain)."""
    after = [r for r in rows if r["minute"] > warmup_minutes + 1e-9]
    return after if len(after) >= 2 else list(rows)


def _slopes(rows: Sequence[dict[str, Any]], warmup_minutes: float) -> dict[str, Any]:
    used = measured_rows(rows, warmup_minutes)
    xs = [r["minute"] for r in used]
    return {
        name: {
            "per_minute": round(slope(xs, ys), 4),
            "mean": round(sum(ys) / len(ys), 3) if ys else 0.0,
            "first": ys[0] if ys else 0.0,
            "last": ys[-1] if ys else 0.0,
        }
        for name, ys in series(used).items()
    } | {"_from_minute": xs[0] if xs else 0.0, "_to_minute": xs[-1] if xs else 0.0}


def is_flat(per_minute: float, mean: float, span_minutes: float) -> bool:
    """Growth over the span, by the fitted slope, under FLAT_SHARE of the level or FLAT_MIB."""
    return per_minute * span_minutes <= max(FLAT_SHARE * mean, FLAT_MIB)


def _targets(
    summary: dict[str, Any],
    slopes: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    warmup_minutes: float,
) -> dict[str, Any]:
    span = float(slopes["_to_minute"]) - float(slopes["_from_minute"])
    agora = [
        label for label in rows[0]["procs"] if label.startswith(("gateway", "fan-out"))
    ] or list(rows[0]["procs"])
    rss = {
        label: {
            "mib_per_minute": slopes[f"{label} MiB"]["per_minute"],
            "flat": is_flat(
                slopes[f"{label} MiB"]["per_minute"], slopes[f"{label} MiB"]["mean"], span
            ),
        }
        for label in rows[0]["procs"]
    }
    redis = slopes["redis used MiB"]
    p_first, p_last = summary["p99_first_ms"], summary["p99_last_ms"]
    return {
        "lost_0": {"target": "0 deliveries lost", "reached": summary["lost"] == 0},
        "p99_stable": {
            "target": f"p99 in the last {summary['window_minutes']:g} min within 20 % of the "
            f"first {summary['window_minutes']:g}",
            "first_ms": p_first,
            "last_ms": p_last,
            "change": round(p_last / p_first - 1, 3) if p_first else None,
            "reached": bool(p_first) and p_last <= p_first * (1 + P99_TOLERANCE),
        },
        "rss_flat": {
            "target": "RSS of the Agora processes flat after the warm-up "
            f"({warmup_minutes:g} min; flat = fitted growth < {FLAT_SHARE:.0%} or "
            f"{FLAT_MIB:g} MiB)",
            "processes": rss,
            "reached": all(rss[label]["flat"] for label in agora),
        },
        "redis_flat": {
            "target": "Redis used_memory flat after the warm-up",
            "mib_per_minute": redis["per_minute"],
            "reached": is_flat(redis["per_minute"], redis["mean"], span),
        },
    }


# -- the report -----------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    s = data["summary"]
    rows = data["rows"]
    labels = list(rows[0]["procs"]) if rows else []
    short = {label: _short(label) for label in labels}
    headers = ["min", "acked", "deliveries", "lost", "p50 ms", "p99 ms", "ack p99 ms"]
    headers += [f"{short[label]} MiB / CPU (wait)" for label in labels]
    headers += ["Redis used MiB", "Redis keys", "broker log records", "backlog"]
    headers += ["load", "others' CPU"]
    table = []
    for r in rows:
        line: list[Any] = [r["minute"], r["acked"], r["deliveries"], r["lost"]]
        line += [r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["ack_ms"]["p99"]]
        line += [_mem_cpu(r["procs"][label]) for label in labels]
        line += [r["redis"]["used_memory_mib"], r["redis"]["keys"], r["broker_log_records"]]
        line.append(r.get("backlog", ""))
        line += [r["load1"], r.get("others_cores", "")]
        table.append(line)
    sl = data["slopes"]
    slope_line: list[Any] = ["slope/min", "", "", sl["lost"]["per_minute"]]
    slope_line += [sl["p50 ms"]["per_minute"], sl["p99 ms"]["per_minute"], ""]
    slope_line += [
        f"{sl[f'{label} MiB']['per_minute']:+.3f} / {sl[f'{label} CPU']['per_minute']:+.4f}"
        for label in labels
    ]
    slope_line += [f"{sl['redis used MiB']['per_minute']:+.3f}", sl["redis keys"]["per_minute"]]
    slope_line += [sl["broker log records"]["per_minute"], sl["backlog"]["per_minute"]]
    slope_line += ["", ""]
    table.append(slope_line)
    c0, c1 = data["conditions"], data["conditions_end"]
    lines = [
        "### Soak (`bench.soak`)",
        "",
        f"`{data['command']}`",
        "",
        machine_line(data["machine"], c0)
        + f"; load at the end {c1['loadavg'][0]}/{c1['loadavg'][1]}/{c1['loadavg'][2]}, "
        f"mean of the per-minute 1-min load {s['load1_mean']}; other sessions' processes "
        f"used {s.get('others_cores_mean', '?')} of the {data['machine']['nproc']} cores "
        "on average ('others' CPU')",
        "",
        f"{s['shape']}, {s['senders']} senders, {s['rate']:g} msgs/s for {s['minutes']:g} min: "
        f"{s['subscribed']}/{s['members']} subscribed, connect failures "
        f"{s['connect_failures'] or 'none'}; {s['acked']:,} acked ({s['unacked']} unacked), "
        f"{s['delivered']:,}/{s['expected']:,} deliveries after a drain of {s['drain_s']} s: "
        f"**{s['lost']} lost** ({s['lost_stored']} stored but not delivered, "
        f"{s['lost_never_stored']} of {s['messages_never_stored']} acked messages never "
        f"stored; {s['lost_in_warmup']} sent in the {data['params']['warmup_s']:g} s warm-up), "
        f"{s['duplicated']} duplicated, {s['reordered']} reordered.",
        "",
        "Per row: the interval ending at that minute. Lost is charged to the interval the "
        "message was sent in. Memory is RSS (PostgreSQL: the PSS of its postmaster and all its "
        "children, whose count is in the JSON), CPU in cores, wait = cores' worth of time its "
        "threads were runnable but had no core (starved by neighbours); backlog = messages "
        "acked but not yet stored in a shard (held by the broker or the fan-out worker; "
        "negative while acks reach the senders after the rows are written). "
        "Slopes are least "
        "squares per "
        f"minute over minutes {sl['_from_minute']:g}-{sl['_to_minute']:g} (after the "
        "warm-up).",
        "",
        md_table(headers, table),
        "",
    ]
    for key, t in data["targets"].items():
        extra = ""
        if key == "p99_stable":
            extra = f" (first {t['first_ms']} ms, last {t['last_ms']} ms, change {t['change']})"
        elif key == "rss_flat":
            grown = [
                f"{label} {p['mib_per_minute']:+.3f} MiB/min"
                for label, p in t["processes"].items()
                if not p["flat"]
            ]
            extra = f" (not flat: {', '.join(grown)})" if grown else ""
        elif key == "redis_flat":
            extra = f" ({t['mib_per_minute']:+.3f} MiB/min)"
        lines.append(f"- {t['target']}: {verdict(t['reached'])}{extra}")
    if data.get("redis_keys"):
        lines += ["", "Redis keys at the end, by kind:", ""]
        lines.append(
            md_table(
                ["kind", "keys", "bytes/key (MEMORY USAGE)", "TTL s (sample max)"],
                [
                    [k, v["keys"], v["bytes_per_key"], v["ttl_s_sample"]]
                    for k, v in data["redis_keys"].items()
                ],
            )
        )
    for label, prof in (data.get("profiles") or {}).items():
        if prof and "error" not in prof:
            lines += ["", f"{label}, last interval (py-spy):", "", render_profile(prof)]
    return "\n".join(lines)


def _mem_cpu(p: dict[str, float]) -> str:
    return f"{p['rss_mib']:.1f} / {p['cpu']:.2f} ({p.get('wait', 0.0):.2f})"


def _short(label: str) -> str:
    return {
        "gateway A": "gw A",
        "gateway B": "gw B",
        "broker (Tansu)": "broker",
        "PostgreSQL": "PG",
        "load generator": "loadgen",
    }.get(label, label.replace("fan-out worker ", "fan-out "))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=200.0, help="total msgs/s")
    p.add_argument("--convs", type=int, default=20)
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--senders", type=int, default=20)
    p.add_argument("--interval", type=float, default=60.0, help="seconds per row")
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="left out of the slopes")
    p.add_argument(
        "--warmup-s", type=float, default=10.0, help="unmeasured sending before minute 0"
    )
    p.add_argument(
        "--drain",
        type=float,
        default=60.0,
        help="at the end: give up after this many s without a delivery",
    )
    p.add_argument("--drain-cap", type=float, default=900.0, help="...or this many s in all")
    p.add_argument("--body-bytes", type=int, default=100)
    p.add_argument("--procs", type=int, default=0)
    p.add_argument("--fanout-workers", type=int, default=1)
    p.add_argument("--source-ips", type=int, default=8)
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy gateway A and the fan-out workers during the last interval",
    )
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--results-md", default=str(RESULTS_MD))
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0:
        p.error("--minutes and --interval must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = run(args)
    md = Path(args.results_md) if args.results_md else None
    path = write_results(NAME, data, render(data), Path(args.out), md)
    s = data["summary"]
    print(
        f"{NAME}: lost {s['lost']} (stored {s['lost_stored']}, never stored "
        f"{s['lost_never_stored']}), p99 first {s['p99_first_ms']} ms / last "
        f"{s['p99_last_ms']} ms -> {path}"
    )
    return data


if __name__ == "__main__":
    main()
