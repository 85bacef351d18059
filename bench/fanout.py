"""Fan-out: R conversations x M members over two gateway processes, S senders at a fixed
total rate, stepped up; and a large-room broadcast on one gateway process.

Per rate step: acked sends, deliveries/s, expected vs delivered (lost, duplicated,
reordered), end-to-end latency p50/p95/p99 (the body carries the send time; senders and
receivers share the machine's clock), each gateway's CPU, and deliveries per gateway
CPU-second. Reported: the highest rate held with p99 under 100 ms and nothing lost.

    .venv/bin/python -m bench.fanout --convs 50 --members 20 --rates 250,500,1000,2000
    .venv/bin/python -m bench.fanout --room 5000 --rates 2,5,10,20   # large-room broadcast
    .venv/bin/python -m bench.fanout --pin-server-core 0 --profile-all   # issue 14

`--pin-server-core N` puts the whole server side but PostgreSQL on core N (both gateways,
the fan-out worker, the Tansu broker, and a Redis started for the run) and the load
generator on the other core(s); its defaults are issue 14's scenario (rates 100 and 500
msgs/s, 20 s each, 64-byte bodies). Every step then reports the CPU-seconds of each
component read from /proc (utime + stime), PostgreSQL's as the sum over its postmaster and
every process under it (backends, WAL writer, checkpointer). `--profile-all` runs py-spy
on every Agora process (both gateways and the fan-out worker) during the profiled step.

Members alternate between the two gateways (conversations mode); in room mode every
member is on gateway A and the senders on gateway B, so A's CPU is delivery only, unless
`--room-gateways 2` alternates the members between A and B (issue 14's target 5: the room
over two gateways). Each step reports each gateway's user and system CPU apart: on
loopback a socket write's system time includes the receiver's TCP processing. The room
is a post's thread (public, any size) when the posts API answers, else a group (at most
1,000 members, so several connections per member).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    RESULTS_MD,
    SOURCE_IPS,
    command_line,
    conditions,
    core_shares,
    core_ticks,
    cpu_by_process,
    cpu_seconds_by,
    cpu_sets,
    cpu_snapshot,
    descendants,
    experiment_note,
    machine,
    machine_line,
    md_table,
    metric_samples,
    percentiles,
    pin,
    proc_cpu_split_s,
    raise_nofile,
    read_timing,
    result_name,
    sample_value,
    timing_env,
    verdict,
    wait_until,
    write_results,
)
from bench.loadgen import WorkerPool, split
from bench.members import Member, Sender, SubClient, SubRefused, create_groups, seq_report
from bench.profile import Profiler
from bench.profile import render as render_profile
from bench.stack import BenchProc, BenchStack, bench_stack, http_json, unique_tag
from bench.stages import attribute as stage_attribute
from bench.stages import read_rows as stage_rows
from bench.stages import render as render_stages
from bench.storm import failure_reason
from bench.wsclient import HandshakeError, open_client
from core.settings import Settings
from storage import messages
from storage.pools import ShardPools

NAME = "fanout"
ROOM_NAME = "fanout-room"
PINNED_NAME = "fanout-pinned"
MAX_LATENCY_SAMPLES = 300_000  # per worker per step (a uniform sample beyond it)


class FanoutWorker:
    """A load-generator process: some members, some senders, one send loop."""

    def __init__(self) -> None:
        self.members: list[tuple[Member, int]] = []  # (member, gateway port)
        self.senders: list[tuple[Sender, str, int]] = []  # (sender, conv, port)
        self.ips: list[str] = []
        self.sent_by_conv: Counter[str] = Counter()
        self.last_msg = 0.0
        self._send_task: asyncio.Task[None] | None = None

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
                tokens[u] = make_token(secret, u, None, 3600)
            return tokens[u]

        self.members = [(Member(u, token(u), c), p) for u, c, p in members]
        self.senders = [(Sender("127.0.0.1", p, token(u), u), c, p) for u, c, p in senders]
        self.ips = ips
        return len(self.members)

    async def connect(self, inflight: int, timeout: float) -> dict[str, Any]:
        sem = asyncio.Semaphore(max(1, inflight))
        failures: Counter[str] = Counter()

        async def member(i: int, m: Member, port: int) -> None:
            for attempt in range(6):
                async with sem:
                    c = SubClient(m, "127.0.0.1", port)
                    try:
                        ip = self.ips[i % len(self.ips)]
                        await open_client(c, "127.0.0.1", port, ip, timeout)
                        m.client = c
                        await asyncio.wait_for(c.subscribe(None), timeout)
                        return
                    except HandshakeError as exc:
                        if exc.status not in (429, 503) or attempt == 5:
                            failures[f"member:{failure_reason(exc)}"] += 1
                            return
                        retry_after = float(exc.retry_after or 1)
                    except SubRefused as exc:
                        # `unavailable` (a shard busy while 1,000 connect at once on one
                        # core) is retryable (docs/protocol.md): close, retry later.
                        c.abort()
                        if exc.code not in ("unavailable", "rate_limited") or attempt == 5:
                            failures[f"member:sub_{exc.code}"] += 1
                            return
                        retry_after = 1.0
                    except Exception as exc:
                        failures[f"member:{failure_reason(exc)}"] += 1
                        return
                await asyncio.sleep(random.uniform(0, retry_after))  # docs/protocol.md: jitter

        async def sender(i: int, s: Sender, port: int) -> None:
            async with sem:
                try:
                    await open_client(s, "127.0.0.1", port, self.ips[i % len(self.ips)], timeout)
                except Exception as exc:
                    failures[f"sender:{failure_reason(exc)}"] += 1

        await asyncio.gather(*(member(i, m, p) for i, (m, p) in enumerate(self.members)))
        await asyncio.gather(*(sender(i, s, p) for i, (s, _, p) in enumerate(self.senders)))
        return {
            "subbed": sum(1 for m, _ in self.members if m.subbed),
            "senders": sum(1 for s, _, _ in self.senders if s.is_open),
            "failures": dict(failures),
        }

    async def start_step(
        self, step: int, rate: float, duration: float, pad: str, arrivals: bool = False
    ) -> None:
        for m, _ in self.members:
            m.latencies = []
            m.arrivals = [] if arrivals else None
            m.record = True
        for s, _, _ in self.senders:
            s.ack_ms = []
        self._send_task = asyncio.get_running_loop().create_task(
            self._send_loop(step, rate, duration, pad)
        )

    async def _send_loop(self, step: int, rate: float, duration: float, pad: str) -> None:
        senders = self.senders
        if not senders or rate <= 0:
            # An idle step (rate 0): the connections' own cost (heartbeats, leases,
            # timers) over as long a spell as a loaded step.
            await asyncio.sleep(duration if rate == 0 else 0)
            return
        start = time.monotonic()
        sent = 0
        i = random.randrange(len(senders))
        while True:
            now = time.monotonic()
            if now - start >= duration:
                break
            due = int((now - start) * rate)
            while sent < due:
                s, conv, _ = senders[i % len(senders)]
                s.send_msg(conv, f"b{step}-{i}-{sent}", pad)
                self.sent_by_conv[conv] += 1
                sent += 1
                i += 1
            await asyncio.sleep(0.002)

    async def finish_sends(self, timeout: float) -> dict[str, Any]:
        """Wait for the step's sends to end and their acks; acked counts so far (cumulative)."""
        if self._send_task is not None:
            await self._send_task
        await wait_until(lambda: not any(s.pending for s, _, _ in self.senders), timeout)
        acked: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        ack_ms: list[float] = []
        for s, _, _ in self.senders:
            acked.update(s.acked)
            errors.update(s.errors)
            ack_ms += s.ack_ms
        return {
            "sent": sum(self.sent_by_conv.values()),
            "acked": dict(acked),
            "errors": dict(errors),
            "unacked": sum(len(s.pending) for s, _, _ in self.senders),
            "ack_ms": ack_ms,
        }

    async def collect(self, totals: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait until every member has its conversation's total (or the timeout)."""
        members = [m for m, _ in self.members]
        await wait_until(lambda: all(m.received >= totals.get(m.conv, 0) for m in members), timeout)
        latencies = [x for m in members for x in m.latencies]
        if len(latencies) > MAX_LATENCY_SAMPLES:
            latencies = random.sample(latencies, MAX_LATENCY_SAMPLES)
        for m in members:
            m.record = False
        errors: Counter[str] = Counter()
        for m in members:
            errors.update(m.errors)
        # Per gateway port: (send ns, receive ns) of each delivery (bench/stages.py).
        arrivals: dict[int, list[tuple[int, int]]] = {}
        for m, port in self.members:
            if m.arrivals:
                arrivals.setdefault(port, []).extend(m.arrivals)
                m.arrivals = None
        for port, pairs in arrivals.items():
            if len(pairs) > MAX_LATENCY_SAMPLES // 4:
                arrivals[port] = random.sample(pairs, MAX_LATENCY_SAMPLES // 4)
        return {
            "arrivals": {str(p): v for p, v in arrivals.items()},
            **seq_report(members, totals),
            "t_last": max((m.t_last for m in members), default=0.0),
            "latencies_us": latencies,
            "received_frames": sum(m.received + m.dups for m in members),
            "closed": sum(1 for m in members if m.client is None or not m.client.is_open),
            "frame_errors": dict(errors),
        }

    async def close(self) -> None:
        for m, _ in self.members:
            if m.client is not None:
                m.client.abort()
        for s, _, _ in self.senders:
            s.abort()
        await asyncio.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    raise_nofile()
    gw_cpus, lg_cpus = cpu_sets()
    server_cpus = None
    if args.pin_server_core >= 0:
        server_cpus = {args.pin_server_core}
        lg_cpus = (set(os.sched_getaffinity(0)) - server_cpus) or None
    room = args.room > 0
    clients = args.room if room else args.convs * args.members
    procs = args.procs or max(1, min(4, math.ceil(clients / 4000)))
    env = timing_env(Path(args.out))
    env["BENCH_STAGES_OUT"] = str(Path(args.out).resolve() / "stages")
    for old in Path(args.out).glob("stages.*.jsonl"):
        old.unlink()  # an earlier run's stamps in this directory
    if server_cpus:
        # Production's pool size and wait (tests/engines.py has 4 and 3 s for a PostgreSQL
        # shared by every test process): 1,000 subscribes on one core must not time out.
        env.update({"AGORA_PG_POOL_MAX": "10", "AGORA_PG_TIMEOUT_S": "5"})
    for item in args.agora_env:
        name, _, value = item.partition("=")
        if not name.startswith("AGORA_"):
            raise SystemExit(f"--agora-env {item!r}: not an AGORA_ setting")
        env[name] = value
    with bench_stack(gw_cpus, env, experiment=args.experiment, server_cpus=server_cpus) as stack:
        tag = unique_tag()
        a = stack.gateway(f"fo-a-{tag}")
        b = stack.gateway(f"fo-b-{tag}")
        for i in range(args.fanout_workers):
            stack.fanout(f"fo-f{i}-{tag}")
        pin(lg_cpus)
        pool = WorkerPool("bench.fanout:FanoutWorker", procs, lg_cpus)
        try:
            return uvloop.run(_measure(args, stack, a, b, pool, tag, procs))
        finally:
            pool.close()


def _plan_conversations(
    args: argparse.Namespace, stack: BenchStack, a: BenchProc, b: BenchProc, tag: str
) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]], str]:
    """(members, senders, description) for R conversations x M members."""
    ports = [a.port or 0, b.port or 0]
    groups = []
    for c in range(args.convs):
        users = [f"f{tag}-{c}-{j}" for j in range(args.members)]
        groups.append((users[0], users))
    convs = create_groups(a.http_url, stack.token, groups)
    members = [
        (u, conv, ports[j % 2])
        for conv, (_, users) in zip(convs, groups, strict=True)
        for j, u in enumerate(users)
    ]
    senders = []
    for k in range(args.senders):
        c = k % args.convs
        j = (k // args.convs) % args.members
        senders.append((groups[c][1][j], convs[c], ports[k % 2]))
    return members, senders, f"{args.convs} conversations x {args.members} members"


def _plan_room(
    args: argparse.Namespace, stack: BenchStack, a: BenchProc, b: BenchProc, tag: str
) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]], str]:
    """One conversation with `args.room` subscribers on A (or alternately on A and B with
    `--room-gateways 2`); senders on B."""
    owner = f"o{tag}"
    status, post = http_json(
        "POST",
        f"{b.http_url}/v1/posts",
        stack.token(owner),
        {"title": "bench room", "body": "", "community": "bench"},
    )
    senders_users = [f"rs{tag}-{k}" for k in range(args.senders)]
    if status == 201 and isinstance(post, dict) and post.get("thread"):
        conv = str(post["thread"])
        users = [f"rm{tag}-{i}" for i in range(args.room)]
        kind = f"a post's thread with {args.room} subscribers"
    else:
        # No posts API: a group holds at most 1,000 members; give each several connections.
        n_users = min(999 - len(senders_users), args.room)
        group_users = [f"rm{tag}-{i}" for i in range(n_users)]
        (conv,) = create_groups(
            b.http_url, stack.token, [(group_users[0], group_users + senders_users)]
        )
        users = [group_users[i % n_users] for i in range(args.room)]
        kind = f"a group of {n_users} members with {args.room} connections (posts API: {status})"
    ports = [a.port or 0, b.port or 0][: max(1, min(2, args.room_gateways))]
    members = [(u, conv, ports[i % len(ports)]) for i, u in enumerate(users)]
    senders = [(u, conv, b.port or 0) for u in senders_users]
    return members, senders, kind


async def _measure(
    args: argparse.Namespace,
    stack: BenchStack,
    a: BenchProc,
    b: BenchProc,
    pool: WorkerPool,
    tag: str,
    procs: int,
) -> dict[str, Any]:
    room = args.room > 0
    plan = _plan_room if room else _plan_conversations
    members, senders, shape = await asyncio.to_thread(plan, args, stack, a, b, tag)
    ips = list(SOURCE_IPS[: args.source_ips])
    member_parts = split(members, procs)
    sender_parts = split(senders, procs)
    await pool.call(
        "prepare",
        [
            {"members": mp, "senders": sp, "secret": stack.settings.jwt_secret, "ips": ips}
            for mp, sp in zip(member_parts, sender_parts, strict=True)
        ],
    )
    t0 = time.monotonic()
    parts = await pool.call("connect", {"inflight": max(1, 200 // procs), "timeout": 60})
    connect_s = time.monotonic() - t0
    connect_failures: Counter[str] = Counter()
    for p in parts:
        connect_failures.update(p["failures"])
    subbed = sum(p["subbed"] for p in parts)
    open_senders = sum(p["senders"] for p in parts)
    conv_members: Counter[str] = Counter(c for _, c, _ in members)
    pad = "x" * max(0, args.body_bytes - 20)
    await asyncio.sleep(1.0)

    # Warm-up: the first messages pay for the consumer group join and the caches.
    steps_out: list[dict[str, Any]] = []
    prev_totals: Counter[str] = Counter()
    prev_report: Counter[str] = Counter()
    prev_sent = 0
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    cond = conditions()
    profile: dict[str, Any] | None = None
    profiles: dict[str, Any] = {}
    warmup_rate = args.warmup_rate or (1.0 if room else 50.0)
    stages = "stages" in args.experiment.split(",")
    for step, rate in enumerate([warmup_rate, *rates]):
        warm = step == 0
        duration = args.warmup_duration if warm else args.duration
        per_worker = [rate * len(sp) / max(1, len(senders)) for sp in sender_parts]
        cpu_a, cpu_b = a.cpu_s(), b.cpu_s()
        split0 = proc_cpu_split_s(a.pid) + proc_cpu_split_s(b.pid)
        written0 = _write_latency([a, b])
        consumer0 = _consumer_counts(stack)
        kafka0 = _kafka_counts(stack, a, b)
        sched_a, sched_b = a.sched_s(), b.sched_s()
        sleeps0 = _sleeps(a.pid) + _sleeps(b.pid)
        snap = cpu_snapshot()
        ticks = core_ticks()
        profiler = None
        profilers: dict[str, Profiler] = {}
        profiled = not warm and rate == (args.profile_rate or rates[-1])
        if args.profile and profiled:
            profiler = Profiler(
                a.pid, Path(args.out) / f"{_name(args)}-{int(rate)}-profile.txt", native=args.native
            )
            profiler.start()
        if args.profile_all and profiled:
            for label, proc in _agora_procs(stack, a, b).items():
                path = Path(args.out) / f"{_name(args)}-{int(rate)}-{label}-profile.txt"
                profilers[label] = Profiler(proc.pid, path, native=args.native).start()
        t_start = time.monotonic()
        t_start_ns = time.time_ns()
        await pool.call(
            "start_step",
            [
                {"step": step, "rate": r, "duration": duration, "pad": pad, "arrivals": stages}
                for r in per_worker
            ],
        )
        sends = await pool.call("finish_sends", {"timeout": 30.0})
        totals: Counter[str] = Counter()
        for s in sends:
            totals.update(s["acked"])
        got = await pool.call("collect", {"totals": dict(totals), "timeout": args.drain})
        t_end = time.monotonic()
        if profiler is not None:
            profile = profiler.stop()
        if profilers:
            profiles = {label: p.stop() for label, p in profilers.items()}
        snap_end = cpu_snapshot()
        ticks_end = core_ticks()
        consumer = {
            k.removeprefix("agora_consumer_"): v - consumer0.get(k, 0.0)
            for k, v in _consumer_counts(stack).items()
        }
        kafka = {k: v - kafka0.get(k, 0.0) for k, v in _kafka_counts(stack, a, b).items()}
        cpu_a, cpu_b = a.cpu_s() - cpu_a, b.cpu_s() - cpu_b
        cpu_split = [
            x - x0
            for x, x0 in zip(proc_cpu_split_s(a.pid) + proc_cpu_split_s(b.pid), split0, strict=True)
        ]
        elapsed = t_end - t_start
        # Times each gateway blocked (went idle) and was woken again: its event loop's
        # wake-ups from idle, each paid in full on this VM (bench/RESULTS.md).
        sleeps = [x - x0 for x, x0 in zip(_sleeps(a.pid) + _sleeps(b.pid), sleeps0, strict=True)]
        wait_a = a.sched_s()[1] - sched_a[1]
        wait_b = b.sched_s()[1] - sched_b[1]
        t_last = max(g["t_last"] for g in got)
        delivery_window = max(duration, t_last - t_start)
        machine_cpu = cpu_by_process(
            snap,
            snap_end,
            elapsed,
            {
                a.pid: "gateway A",
                b.pid: "gateway B",
                **{p.pid: "fan-out worker" for p in stack.procs if p.name.startswith("fo-f")},
                **{p: "load generator" for p in pool.pids},
            },
        )
        report: Counter[str] = Counter()
        for g in got:
            for k in ("expected", "delivered", "lost", "duplicated", "reordered"):
                report[k] += g[k]
        step_acked = sum(totals.values()) - sum(prev_totals.values())
        delta = {k: report[k] - prev_report[k] for k in ("expected", "delivered", "duplicated")}
        delta["reordered"] = report["reordered"] - prev_report["reordered"]
        latencies_ms = [x / 1000 for g in got for x in g["latencies_us"]]
        ack_ms = [x for s in sends for x in s["ack_ms"]]
        errors: Counter[str] = Counter()
        for s in sends:
            errors.update(s["errors"])
        lat = percentiles(latencies_ms)
        deliveries = delta["delivered"]
        out = {
            "rate": rate,
            "warmup": warm,
            "duration_s": duration,
            "elapsed_s": round(elapsed, 2),
            # Wall clock of the step (epoch s), to line it up with outside samplers.
            "wall_s": [round(t_start_ns / 1e9, 2), round(t_start_ns / 1e9 + elapsed, 2)],
            "sent": sum(s["sent"] for s in sends) - prev_sent,
            "acked": step_acked,
            "send_errors": dict(errors),
            "unacked": sum(s["unacked"] for s in sends),
            "expected": delta["expected"],
            "delivered": deliveries,
            "lost_total": report["lost"],
            "duplicated": delta["duplicated"],
            "reordered": delta["reordered"],
            # Over the time the deliveries really took (sending window, or until the last).
            "deliveries_per_s": round(deliveries / delivery_window, 1),
            "delivery_window_s": round(delivery_window, 2),
            # Runnable but not running (a neighbour had the core), share of the step.
            "gateway_wakeups": {"a": sleeps[0], "b": sleeps[1]},
            "gateway_a_runqueue_wait": round(wait_a / elapsed, 2),
            "gateway_b_runqueue_wait": round(wait_b / elapsed, 2),
            "latency_ms": lat,
            "ack_ms": percentiles(ack_ms),
            "gateway_a_cpu": round(cpu_a / elapsed, 2),
            "gateway_b_cpu": round(cpu_b / elapsed, 2),
            # CPU-seconds of the step, user and system apart, and per delivery (us) over
            # the gateways that deliver (A, or A and B with --room-gateways 2).
            "gateway_cpu_split_s": {
                "a_user": round(cpu_split[0], 2),
                "a_sys": round(cpu_split[1], 2),
                "b_user": round(cpu_split[2], 2),
                "b_sys": round(cpu_split[3], 2),
            },
            # Server side alone: how many of the step's writes left within 50/100/250 ms.
            "gateway_written_within": _written_within(written0, _write_latency([a, b])),
            "gateway_us_per_delivery": _us_per_delivery(cpu_split, deliveries, room, args),
            "deliveries_per_gateway_cpu_s": round(
                deliveries
                / max(1e-6, (cpu_a if room and args.room_gateways < 2 else cpu_a + cpu_b)),
                1,
            ),
            "closed_members": sum(g["closed"] for g in got),
            "cpu": machine_cpu,
            # Per core: busy and interrupt/softirq shares of the step (on loopback the
            # server's core runs the clients' receive processing in softirq: core_shares).
            "cores": core_shares(ticks, ticks_end),
            "cpu_s": _component_cpu_s(stack, a, b, pool, snap, snap_end),
            # The fan-out workers' batches over the step: records per batch says how much
            # each transaction, publish and offset commit is shared.
            "consumer": {k: round(v, 3) for k, v in consumer.items()},
            # What the broker was asked over the step, summed over the Agora processes: the
            # produce line's requests and records (always), and with `--experiment
            # kafka-count` every aiokafka request by API and each produce path's batches.
            "kafka": {k: round(v) for k, v in sorted(kafka.items()) if v},
        }
        if stages and not warm:
            out["stages"] = await _stages(
                args, got, {a.port or 0: a.pid, b.port or 0: b.pid}, t_start_ns
            )
        prev_sent = sum(s["sent"] for s in sends)
        steps_out.append(out)
        prev_totals = totals
        prev_report = report
        print(
            f"  step {rate:g}/s{' (warm-up)' if warm else ''}: acked {step_acked}, delivered "
            f"{deliveries}/{delta['expected']}, lost(total) {report['lost']}, "
            f"{out['deliveries_per_s']:,.0f} deliveries/s, p99 {lat['p99']} ms, "
            f"gw CPU A {out['gateway_a_cpu']} B {out['gateway_b_cpu']}, per delivery "
            f"{out['gateway_us_per_delivery']} us, written within {out['gateway_written_within']}"
        )
        if report["lost"] > 0:
            # Where the missing ones are: never stored (upstream of the fan-out worker's
            # write: the broker or the worker) or stored but not delivered (routing/gateway).
            out["stored_vs_acked"] = await _stored_vs_acked(stack.settings, totals)
            print(f"  undelivered: stored vs acked per conversation {out['stored_vs_acked']}")
        if report["lost"] > 0 and not args.keep_going:
            print("  stopping: this step did not deliver everything within --drain")
            break
    await pool.call("close")

    measured = [s for s in steps_out if not s["warmup"]]
    held = [
        s
        for s in measured
        if s["latency_ms"]["p99"] < 100
        and s["lost_total"] == 0
        and s["acked"] >= 0.95 * s["rate"] * s["duration_s"]
    ]
    best = max(held, key=lambda s: s["rate"]) if held else None
    summary = {
        "mode": "room" if room else "conversations",
        "shape": shape,
        "members": len(members),
        "subscribed": subbed,
        "senders": open_senders,
        "connect_failures": dict(connect_failures),
        "connect_s": round(connect_s, 2),
        "lost": measured[-1]["lost_total"] if measured else None,
        "duplicated": sum(s["duplicated"] for s in measured),
        "reordered": sum(s["reordered"] for s in measured),
        "highest_rate_p99_under_100ms": best["rate"] if best else None,
        "max_deliveries_per_s": max((s["deliveries_per_s"] for s in measured), default=0),
    }
    targets = _targets(args, measured, room)
    return {
        "bench": _name(args),
        "command": command_line(),
        "machine": machine(),
        "conditions": cond,
        "conditions_end": conditions(),
        "params": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "results_md")},
            "procs": procs,
        },
        "summary": summary,
        "steps": steps_out,
        "targets": targets,
        "profile": profile,
        "profiles": profiles,
        "pinned": args.pin_server_core >= 0,
        "conversation_sizes": dict(Counter(conv_members.values())),
        "timing": read_timing(
            Path(args.out),
            {
                a.pid: "gateway A",
                b.pid: "gateway B",
                **{p.pid: p.name for p in stack.procs if p.name.startswith("fo-f")},
            },
        ),
    }


def _sleeps(pid: int) -> list[int]:
    """The process's voluntary context switches over all its threads (0 if unreadable)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    except OSError:
        return [0]
    return [total]


def _us_per_delivery(
    split: list[float], deliveries: int, room: bool, args: argparse.Namespace
) -> dict[str, float]:
    """Gateway CPU per delivery in microseconds, user and system apart. In room mode with
    every member on A, B's CPU is the senders' and is left out."""
    both = not room or args.room_gateways >= 2
    user = split[0] + (split[2] if both else 0.0)
    system = split[1] + (split[3] if both else 0.0)
    n = max(1, deliveries)
    return {"user": round(user / n * 1e6, 2), "sys": round(system / n * 1e6, 2)}


def _targets(args: argparse.Namespace, steps: list[dict[str, Any]], room: bool) -> dict[str, Any]:
    if room:
        best = max((s["deliveries_per_s"] for s in steps), default=0.0)
        return {
            "room_50k": {
                "target": ">= 50,000 deliveries/s per gateway process in a large-room broadcast",
                "best_deliveries_per_s": best,
                "reached": best >= 50_000,
            }
        }
    at = [s for s in steps if s["rate"] == 500]
    ok = bool(at) and all(
        s["lost_total"] == 0
        and s["duplicated"] == 0
        and s["reordered"] == 0
        and s["latency_ms"]["p99"] < 50
        for s in at
    )
    return {
        "convs_500": {
            "target": "50 conversations x 20 members, 500 msgs/s (10,000 deliveries/s): "
            "0 lost/duplicated/reordered, p99 < 50 ms",
            "applies": args.convs == 50 and args.members == 20 and bool(at),
            "p99_ms": at[0]["latency_ms"]["p99"] if at else None,
            "reached": ok,
        }
    }


def _write_latency(procs: list[BenchProc]) -> dict[str, float]:
    """The gateways' own delivery latency histogram (accept to socket write, cumulative
    count by bucket bound `le`), summed over `procs`: what the server adds, without the
    load generator's reading."""
    out: dict[str, float] = {}
    for p in procs:
        bucket = ("agora_delivery_latency_seconds_bucket",)
        for line in metric_samples(f"{p.http_url}/metrics", bucket) or ():
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = out.get(le, 0.0) + sample_value(line)
    return out


def _written_within(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Share of the step's socket writes the gateways made within 50, 100 and 250 ms of
    the message's accept."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    if total <= 0:
        return {}
    return {
        f"{int(float(le) * 1000)}ms": round((after.get(le, 0.0) - before.get(le, 0.0)) / total, 4)
        for le in ("0.05", "0.1", "0.25")
    }


async def _stages(
    args: argparse.Namespace, got: list[dict[str, Any]], pid_of: dict[int, int], since_ns: int
) -> dict[str, Any]:
    """The step's delivery latency stage by stage (bench/stages.py), once every process
    wrote its stamps (each appends them every second)."""
    await asyncio.sleep(2.5)
    received: dict[int, list[tuple[int, int]]] = {}
    for g in got:
        for port, pairs in g["arrivals"].items():
            received.setdefault(pid_of[int(port)], []).extend((int(k), int(t)) for k, t in pairs)
    rows = await asyncio.to_thread(stage_rows, Path(args.out))
    return stage_attribute(rows, received, since_ns)


def _consumer_counts(stack: BenchStack) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in stack.procs:
        for k, v in p.consumer_counts().items():
            out[k] = out.get(k, 0.0) + v
    return out


KAFKA_COUNTERS = ("agora_produce_line_", "bench_kafka_")


def _kafka_counts(stack: BenchStack, a: BenchProc, b: BenchProc) -> dict[str, float]:
    """The broker-facing counters of every Agora process (gateways' /metrics and the
    workers' metrics ports), summed, keyed by name and their own label (api, path)."""
    urls = [f"{a.http_url}/metrics", f"{b.http_url}/metrics"]
    urls += [f"http://127.0.0.1:{p.metrics_port}/metrics" for p in stack.procs if p.metrics_port]
    out: dict[str, float] = {}
    for url in urls:
        for line in metric_samples(url, KAFKA_COUNTERS) or ():
            name = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
            labels = line.split("{", 1)[1].split("}", 1)[0] if "{" in line else ""
            own = [x for x in labels.split(",") if x.startswith(("api=", "path="))]
            key = name + (f"[{own[0].split('=', 1)[1].strip(chr(34))}]" if own else "")
            out[key] = out.get(key, 0.0) + sample_value(line)
    return out


def _agora_procs(stack: BenchStack, a: BenchProc, b: BenchProc) -> dict[str, BenchProc]:
    """The Agora processes doing the work, by label (a worker's supervisor idles)."""
    out = {"gateway-a": a, "gateway-b": b}
    workers = [p for p in stack.procs if p.name.startswith("fo-f")]
    for i, p in enumerate(workers):
        out[f"fanout-{i}"] = p
    return out


def _component_cpu_s(
    stack: BenchStack,
    a: BenchProc,
    b: BenchProc,
    pool: WorkerPool,
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
) -> dict[str, float]:
    """CPU-seconds per part of the system over one step (from /proc/<pid>/stat), and the
    server side's total (everything but the load generator)."""
    workers: set[int] = set()
    for p in stack.procs:
        if p.name.startswith("fo-f"):
            workers |= {p.popen.pid, p.pid}  # the supervisor and its worker
    groups = {
        "gateway A": {a.pid},
        "gateway B": {b.pid},
        "fan-out worker": workers,
        "broker (Tansu)": {stack.broker.pid} if stack.broker else set(),
        "Redis": {stack.redis.pid} if stack.redis else set(),
        "PostgreSQL": descendants(after, stack.postgres_pid) if stack.postgres_pid else set(),
    }
    out = cpu_seconds_by(before, after, groups)
    out["server total"] = round(sum(out.values()), 2)
    out["load generator"] = cpu_seconds_by(before, after, {"lg": set(pool.pids)})["lg"]
    return out


def _name(args: argparse.Namespace) -> str:
    if args.room > 0:
        return ROOM_NAME
    return PINNED_NAME if args.pin_server_core >= 0 else NAME


STEP_HEADERS = ["rate/s", "acked", "delivered", "expected", "lost", "dup", "reord"]
STEP_HEADERS += ["deliveries/s", "p50 ms", "p95 ms", "p99 ms", "ack p99 ms", "gw A CPU"]
STEP_HEADERS += ["gw B CPU", "deliv/gw-CPU-s", "gw us/deliv user+sys", "gw A starved"]


def render(data: dict[str, Any]) -> str:
    s = data["summary"]
    room = s["mode"] == "room"
    title = "Large-room broadcast" if room else "Fan-out"
    rows = []
    for st in data["steps"]:
        lat = st["latency_ms"]
        rows.append(
            [
                f"{st['rate']:g}" + (" (warm-up)" if st["warmup"] else ""),
                st["acked"],
                st["delivered"],
                st["expected"],
                st["lost_total"],
                st["duplicated"],
                st["reordered"],
                st["deliveries_per_s"],
                lat["p50"],
                lat["p95"],
                lat["p99"],
                st["ack_ms"]["p99"],
                st["gateway_a_cpu"],
                st["gateway_b_cpu"],
                st["deliveries_per_gateway_cpu_s"],
                _per_delivery_cell(st),
                st.get("gateway_a_runqueue_wait", ""),
            ]
        )
    lines = [
        f"### {title} (`bench.fanout`)" + experiment_note(data),
        "",
        f"`{data['command']}`",
        "",
        machine_line(data["machine"], data["conditions"]),
        "",
        f"{s['shape']}: {s['subscribed']:,}/{s['members']:,} subscribed, {s['senders']} "
        f"senders, connect failures {s['connect_failures'] or 'none'}. Lost is cumulative "
        "(every acked message must reach every member within `--drain` s of the step's end); "
        "gateway CPU in cores; 'gw A starved' = share of the step gateway A was runnable but "
        "waiting for its core (neighbours).",
        "",
        md_table(STEP_HEADERS, rows),
        "",
        f"Highest rate with p99 < 100 ms and nothing lost: "
        f"**{s['highest_rate_p99_under_100ms'] or 'none'}** msgs/s; most deliveries/s: "
        f"{s['max_deliveries_per_s']:,.0f}.",
        "",
        "CPU by process at the last step (cores): " + str(data["steps"][-1]["cpu"]),
        "",
        "Cores per step, busy share (of it interrupts and softirqs: on loopback the "
        "receiving sockets' TCP processing, run on the writer's core and counted in its "
        "system time): " + _cores_line(data["steps"]),
        "",
    ]
    for key, t in data["targets"].items():
        if t.get("applies", True):
            lines.append(f"- {t['target']}: {verdict(t['reached'])}")
        else:
            lines.append(f"- {t['target']}: n/a for these parameters ({key})")
    if data.get("pinned"):
        lines += ["", *_render_pinned(data)]
    for st in data["steps"]:
        if "stages" in st:
            lines += [
                "",
                f"Delivery latency by stage at {st['rate']:g} msgs/s (bench/stages.py):",
                "",
            ]
            lines += render_stages(st["stages"])
    if data.get("profile"):
        lines += ["", "Gateway A profile (one step):", "", render_profile(data["profile"])]
    for label, prof in (data.get("profiles") or {}).items():
        lines += ["", f"Profile of {label} (one step):", "", render_profile(prof, top=10)]
    return "\n".join(lines)


def _cores_line(steps: list[dict[str, Any]]) -> str:
    parts = []
    for st in steps:
        cores = st.get("cores") or {}
        cells = ", ".join(
            f"{name} {c['busy']:.0%} ({c['irq']:.0%})" for name, c in sorted(cores.items())
        )
        if cells:
            parts.append(f"{st['rate']:g}/s: {cells}")
    return "; ".join(parts) or "-"


def _per_delivery_cell(st: dict[str, Any]) -> str:
    per = st.get("gateway_us_per_delivery")
    return f"{per['user']:.2f}+{per['sys']:.2f}" if per else ""


CPU_PARTS = ["gateway A", "gateway B", "fan-out worker", "broker (Tansu)", "Redis", "PostgreSQL"]


def _per_batch(c: dict[str, float]) -> str:
    batches = c.get("batches_total", 0.0)
    if not batches:
        return ""
    return (
        f"{batches:,.0f} x {c.get('records_total', 0.0) / batches:.1f} rec, "
        f"{1000 * c.get('batch_seconds_sum', 0.0) / batches:.1f} ms"
    )


def _render_pinned(data: dict[str, Any]) -> list[str]:
    """Issue 14's table: latency, ack, loss and CPU-seconds per component, per step."""
    rows = []
    for st in data["steps"]:
        lat, ack, cpu = st["latency_ms"], st["ack_ms"], st.get("cpu_s", {})
        rows.append(
            [
                f"{st['rate']:g}" + (" (warm-up)" if st["warmup"] else ""),
                st["elapsed_s"],
                lat["p50"],
                lat["p99"],
                ack["p50"],
                ack["p99"],
                f"{st['lost_total']}/{st['duplicated']}/{st['reordered']}",
                *[cpu.get(k, 0.0) for k in CPU_PARTS],
                cpu.get("server total", 0.0),
                cpu.get("load generator", 0.0),
                _per_batch(st.get("consumer", {})),
            ]
        )
    headers = ["rate/s", "step s", "deliv p50", "deliv p99", "ack p50", "ack p99"]
    headers += ["lost/dup/reord", *CPU_PARTS, "server total", "load gen", "worker batches"]
    return [
        f"Pinned: the server side but PostgreSQL on core {data['params']['pin_server_core']} "
        "(gateways, fan-out worker, Tansu, a private Redis), the load generator on the other; "
        "latencies in ms; CPU-seconds over each step (from its first send until the last "
        "delivery), read from /proc/<pid>/stat; PostgreSQL unpinned, its postmaster and every "
        "process under it.",
        "",
        md_table(headers, rows),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--convs", type=int, default=50)
    p.add_argument("--members", type=int, default=20)
    p.add_argument("--senders", type=int, default=50)
    p.add_argument("--room", type=int, default=0, help="large-room mode: subscribers on A")
    p.add_argument(
        "--room-gateways",
        type=int,
        default=1,
        help="room mode: members on A only (1) or alternately on A and B (2)",
    )
    p.add_argument(
        "--rates", default=None, help="total msgs/s per step (250,500,1000,2000; pinned: 100,500)"
    )
    p.add_argument(
        "--warmup-rate", type=float, default=0.0, help="0: 50/s (conversations), 1/s (room)"
    )
    p.add_argument("--warmup-duration", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=None, help="seconds per step (10; pinned: 20)")
    p.add_argument("--drain", type=float, default=30.0, help="most seconds to wait per step")
    p.add_argument("--body-bytes", type=int, default=None, help="100; pinned: 64")
    p.add_argument(
        "--keep-going", action="store_true", help="step on after a step left messages undelivered"
    )
    p.add_argument("--procs", type=int, default=0)
    p.add_argument("--fanout-workers", type=int, default=1)
    p.add_argument("--source-ips", type=int, default=8)
    p.add_argument("--profile", action="store_true", help="py-spy gateway A during one step")
    p.add_argument(
        "--profile-all", action="store_true", help="py-spy every Agora process during that step"
    )
    p.add_argument(
        "--pin-server-core",
        type=int,
        default=-1,
        help="the whole server side but PostgreSQL on this core (issue 14's scenario)",
    )
    p.add_argument("--profile-rate", type=float, default=0.0, help="that step (0: the last)")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--experiment", default="", help="bench.experiment patches, e.g. timing")
    p.add_argument(
        "--agora-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every Agora process, over the test engines' (repeatable), "
        "e.g. AGORA_KAFKA_FETCH_WAIT_MS=10",
    )
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--results-md", default=str(RESULTS_MD))
    args = p.parse_args(argv)
    pinned = args.pin_server_core >= 0
    if args.rates is None:
        args.rates = "100,500" if pinned else "250,500,1000,2000"
    if args.duration is None:
        args.duration = 20.0 if pinned else 10.0
    if args.body_bytes is None:
        args.body_bytes = 64 if pinned else 100
    return args


async def _stored_vs_acked(settings: Settings, acked: Counter[str]) -> dict[str, list[int]]:
    """[stored, acked] for every conversation whose stored count differs from its acks."""
    pools = ShardPools(settings)
    try:
        out: dict[str, list[int]] = {}
        for conv, n in acked.items():
            stored = await messages.latest_seq(pools, int(conv))
            if stored != n:
                out[conv] = [stored, n]
        return out
    finally:
        await pools.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = run(args)
    md = Path(args.results_md) if args.results_md else None
    path = write_results(
        result_name(_name(args), args.experiment), data, render(data), Path(args.out), md
    )
    s = data["summary"]
    print(
        f"{_name(args)}: lost {s['lost']}, dup {s['duplicated']}, reordered {s['reordered']}, "
        f"highest rate p99<100ms {s['highest_rate_p99_under_100ms']}, "
        f"max deliveries/s {s['max_deliveries_per_s']} -> {path}"
    )
    return data


if __name__ == "__main__":
    main()
