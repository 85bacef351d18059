"""Reconnect storm: kill -9 a gateway with all its clients connected and subscribed.

N clients (members of N/members-per-conversation groups) connect to gateway A and
subscribe; senders on gateway B send at a fixed total rate throughout. A is killed with
SIGKILL; every client reconnects to B after a full-jitter backoff and resubscribes with
`since` (its last contiguous seq). Measures the time until all have reconnected and
recovered, and, once the senders stop, expected vs delivered: lost (must be 0),
duplicated, reordered.

    .venv/bin/python -m bench.reconnect --clients 10000 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import math
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
    cpu_by_process,
    cpu_sets,
    cpu_snapshot,
    experiment_note,
    machine,
    machine_line,
    md_table,
    percentiles,
    pin,
    raise_nofile,
    result_name,
    timing_env,
    verdict,
    wait_until,
    write_results,
)
from bench.loadgen import WorkerPool, split
from bench.members import Member, Sender, SubClient, create_groups, seq_report
from bench.profile import Profiler
from bench.profile import render as render_profile
from bench.stack import BenchProc, BenchStack, bench_stack, unique_tag
from bench.storm import failure_reason
from bench.wsclient import open_client

NAME = "reconnect"


class ReconnectWorker:
    """A load-generator process: its members, and their reconnect loop."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.ips: list[str] = []
        self.failover: tuple[str, int] | None = None
        self.base_ms = 1000
        self.cap_ms = 10_000
        self.t_lost: dict[str, float] = {}
        self.attempts: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.connect_errors: Counter[str] = Counter()
        self.sem = asyncio.Semaphore(100)

    async def prepare(self, members: list[tuple[str, str]], secret: str, ips: list[str]) -> int:
        from gateway.auth import make_token

        self.members = [Member(u, make_token(secret, u, None, 3600), c) for u, c in members]
        self.ips = ips
        return len(self.members)

    async def connect(self, host: str, port: int, inflight: int, timeout: float) -> dict[str, Any]:
        sem = asyncio.Semaphore(max(1, inflight))
        failures: Counter[str] = Counter()

        async def one(i: int, m: Member) -> None:
            async with sem:
                c = SubClient(m, host, port, self._lost)
                try:
                    await open_client(c, host, port, self.ips[i % len(self.ips)], timeout)
                    m.client = c
                    await asyncio.wait_for(c.subscribe(None), timeout)
                except Exception as exc:
                    failures[failure_reason(exc)] += 1

        await asyncio.gather(*(one(i, m) for i, m in enumerate(self.members)))
        return {"subbed": sum(m.subbed for m in self.members), "failures": dict(failures)}

    async def arm(self, host: str, port: int, base_ms: int, cap_ms: int) -> None:
        """From now on a lost connection reconnects to (host, port)."""
        self.failover = (host, port)
        self.base_ms = base_ms
        self.cap_ms = cap_ms

    def _lost(self, m: Member, client: SubClient) -> None:
        if self.failover is None or m.client is not client:
            return  # not armed yet, or a failed reconnect attempt (its loop retries)
        self.t_lost[m.user] = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._reconnect(m))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reconnect(self, m: Member) -> None:
        """Reconnect with full-jitter backoff; a `sub` answered `unavailable` is retried on
        the same connection after a backoff (docs/protocol.md: retry later), not by reconnecting."""
        assert self.failover is not None
        host, port = self.failover
        for attempt in range(12):
            # Full jitter: uniform in [0, min(cap, base * 2^attempt)].
            backoff_ms = min(self.cap_ms, self.base_ms * 2**attempt)
            await asyncio.sleep(random.uniform(0, backoff_ms) / 1000)
            self.attempts[m.user] += 1
            c = SubClient(m, host, port, self._lost)
            try:
                async with self.sem:
                    await open_client(c, host, port, random.choice(self.ips), 30)
            except Exception as exc:
                self.connect_errors[failure_reason(exc)] += 1
                c.abort()
                continue
            for sub_try in range(8):
                try:
                    await asyncio.wait_for(c.subscribe(m.last), 30)
                except Exception as exc:
                    self.connect_errors[f"sub:{failure_reason(exc)}"] += 1
                    if not c.is_open:
                        break  # connection gone: reconnect
                    sub_ms = min(self.cap_ms, self.base_ms * 2**sub_try)
                    await asyncio.sleep(random.uniform(0, sub_ms) / 1000)
                    continue
                m.client = c  # only now: a later loss of this connection starts a reconnect
                m.t_recovered = time.monotonic()
                if not c.is_open:
                    self._lost(m, c)
                return
            c.abort()

    async def status(self) -> dict[str, Any]:
        return {
            "members": len(self.members),
            "subbed": sum(1 for m in self.members if m.subbed),
            "lost": len(self.t_lost),
            "recovered": sum(1 for m in self.members if m.t_recovered),
            "reconnecting": len(self.tasks),
        }

    async def verify(self, totals: dict[str, int], timeout: float) -> dict[str, Any]:
        await wait_until(
            lambda: all(m.received >= totals.get(m.conv, 0) for m in self.members), timeout, 0.1
        )
        report = seq_report(self.members, totals)
        recovered = [m.t_recovered for m in self.members if m.t_recovered]
        attempts = list(self.attempts.values())
        errors: Counter[str] = Counter()
        for m in self.members:
            errors.update(m.errors)
        return {
            **report,
            "recovered_at": recovered,
            "lost_at": list(self.t_lost.values()),
            "attempts": attempts,
            "connect_errors": dict(self.connect_errors),
            "frame_errors": dict(errors),
            "open": sum(1 for m in self.members if m.client is not None and m.client.is_open),
        }

    async def close(self) -> None:
        self.failover = None
        for t in list(self.tasks):
            t.cancel()
        for m in self.members:
            if m.client is not None:
                m.client.abort()
        await asyncio.sleep(0.1)


class SendLoop:
    """Senders (one connection per conversation owner) at a fixed total rate."""

    def __init__(self, senders: list[tuple[Sender, str]], rate: float, pad: str) -> None:
        self.senders = senders
        self.rate = rate
        self.pad = pad
        self.stop = asyncio.Event()
        self.sent = 0

    async def run(self, tag: str) -> None:
        start = time.monotonic()
        i = 0
        while not self.stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                sender, conv = self.senders[i % len(self.senders)]
                sender.send_msg(conv, f"{tag}-{self.sent}", self.pad)
                self.sent += 1
                i += 1
            await asyncio.sleep(0.005)

    async def drain(self, timeout: float) -> None:
        await wait_until(lambda: not any(s.pending for s, _ in self.senders), timeout)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    raise_nofile()
    gw_cpus, lg_cpus = cpu_sets()
    procs = args.procs or max(2, math.ceil(args.clients / 5000))
    env = {
        "AGORA_MAX_CONNECTIONS": str(max(50_000, args.clients + 1000)),
        **timing_env(Path(args.out)),
    }
    with bench_stack(gw_cpus, env, experiment=args.experiment) as stack:
        tag = unique_tag()
        a = stack.gateway(f"rc-a-{tag}")
        b = stack.gateway(f"rc-b-{tag}")
        for i in range(args.fanout_workers):
            stack.fanout(f"rc-f{i}-{tag}")
        pin(lg_cpus)
        pool = WorkerPool("bench.reconnect:ReconnectWorker", procs, lg_cpus)
        try:
            return uvloop.run(_measure(args, stack, a, b, pool, tag, procs))
        finally:
            pool.close()


async def _measure(
    args: argparse.Namespace,
    stack: BenchStack,
    a: BenchProc,
    b: BenchProc,
    pool: WorkerPool,
    tag: str,
    procs: int,
) -> dict[str, Any]:
    per = args.members
    nconv = math.ceil(args.clients / per)
    users = [f"r{tag}-{i}" for i in range(args.clients)]
    groups = [(users[c * per], users[c * per : (c + 1) * per]) for c in range(nconv)]
    t0 = time.monotonic()
    convs = await asyncio.to_thread(create_groups, b.http_url, stack.token, groups)
    setup_s = time.monotonic() - t0
    members = [(u, convs[i // per]) for i, u in enumerate(users)]
    ips = list(SOURCE_IPS[: args.source_ips])
    await pool.call(
        "prepare",
        [
            {"members": ms, "secret": stack.settings.jwt_secret, "ips": ips}
            for ms in split(members, procs)
        ],
    )
    host = "127.0.0.1"
    t1 = time.monotonic()
    parts = await pool.call(
        "connect", {"host": host, "port": a.port, "inflight": max(1, 200 // procs), "timeout": 60}
    )
    connect_s = time.monotonic() - t1
    subbed = sum(p["subbed"] for p in parts)
    first_failures: Counter[str] = Counter()
    for p in parts:
        first_failures.update(p["failures"])
    await pool.call(
        "arm", {"host": host, "port": b.port, "base_ms": args.jitter_ms, "cap_ms": args.cap_ms}
    )

    # Senders: each conversation's owner, connected to B.
    senders: list[tuple[Sender, str]] = []
    for owner, _ in groups:
        s = Sender(host, b.port or 0, stack.token(owner), owner)
        await open_client(s, host, b.port or 0, ips[0], 30)
        senders.append((s, convs[len(senders)]))
    loop = SendLoop(senders, args.rate, "x" * args.body_bytes)
    cond = conditions()
    send_task = asyncio.create_task(loop.run(tag))
    await asyncio.sleep(args.pre)

    profiler = Profiler(
        b.pid, Path(args.out) / f"{NAME}-{args.clients}-profile.txt", native=args.native
    )
    if args.profile:
        profiler.start()
    cpu_b = b.cpu_s()
    wait_b = b.sched_s()[1]
    snap = cpu_snapshot()
    t_kill = time.monotonic()
    a.kill()
    # Wait until every member has recovered (or the limit).
    status: list[dict[str, Any]] = []
    while time.monotonic() - t_kill < args.limit:
        await asyncio.sleep(0.25)
        status = await pool.call("status")
        if sum(s["recovered"] for s in status) >= subbed:
            break
    t_all = time.monotonic() - t_kill
    cpu_b = b.cpu_s() - cpu_b
    wait_b = b.sched_s()[1] - wait_b
    machine_cpu = cpu_by_process(snap, cpu_snapshot(), t_all, {b.pid: "gateway B (under test)"})
    profile = profiler.stop() if args.profile else None
    await asyncio.sleep(args.post)
    loop.stop.set()
    await send_task
    await loop.drain(15)
    totals: Counter[str] = Counter()
    send_errors: Counter[str] = Counter()
    ack_ms: list[float] = []
    unacked = 0
    for s, _ in senders:
        totals.update(s.acked)
        send_errors.update(s.errors)
        ack_ms += s.ack_ms
        unacked += len(s.pending)
    results = await pool.call("verify", {"totals": dict(totals), "timeout": args.verify_timeout})
    await pool.call("close")
    for s, _ in senders:
        s.abort()

    recovered_at = [x - t_kill for r in results for x in r["recovered_at"]]
    report: Counter[str] = Counter()
    for r in results:
        for k in ("expected", "delivered", "lost", "duplicated", "reordered", "beyond_acked"):
            report[k] += r[k]
    connect_errors: Counter[str] = Counter()
    frame_errors: Counter[str] = Counter()
    for r in results:
        connect_errors.update(r["connect_errors"])
        frame_errors.update(r["frame_errors"])
    attempts = [x for r in results for x in r["attempts"]]
    summary = {
        "clients": args.clients,
        "conversations": nconv,
        "members_per_conversation": per,
        "subscribed_before_kill": subbed,
        "first_connect_failures": dict(first_failures),
        "first_connect_s": round(connect_s, 2),
        "setup_groups_s": round(setup_s, 2),
        "send_rate": args.rate,
        "sent": loop.sent,
        "acked": sum(totals.values()),
        "send_errors": dict(send_errors),
        "unacked": unacked,
        "ack_ms": percentiles(ack_ms),
        "recovered": len(recovered_at),
        "all_recovered_s": round(t_all, 3) if len(recovered_at) >= subbed else None,
        "recovery_s": percentiles(recovered_at),
        "reconnect_attempts": percentiles(attempts),
        "reconnect_errors": dict(connect_errors),
        "frame_errors": dict(frame_errors),
        "gateway_b_cpu_s_during_storm": round(cpu_b, 2),
        **{k: report[k] for k in ("expected", "delivered", "lost", "duplicated", "reordered")},
        "beyond_acked": report["beyond_acked"],
        "open_at_end": sum(r["open"] for r in results),
        "cpu_during_storm": machine_cpu,
        "gateway_b_runqueue_wait": round(wait_b / max(t_all, 1e-6), 2),
    }
    return {
        "bench": NAME,
        "command": command_line(),
        "machine": machine(),
        "conditions": cond,
        "conditions_end": conditions(),
        "params": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "results_md")},
            "procs": procs,
        },
        "summary": summary,
        "targets": {
            "zero_lost": {"target": "messages lost must be zero", "reached": report["lost"] == 0},
        },
        "profile": profile,
    }


HEADERS = ["clients", "convs", "recovered", "all recovered s", "p50 s", "p99 s", "sent"]
HEADERS += ["acked", "lost", "dup", "reordered"]


def render(data: dict[str, Any]) -> str:
    s = data["summary"]
    r = s["recovery_s"]
    lines = [
        "### Reconnect storm (`bench.reconnect`)" + experiment_note(data),
        "",
        f"`{data['command']}`",
        "",
        machine_line(data["machine"], data["conditions"]),
        "",
        md_table(
            HEADERS,
            [
                [
                    s["clients"],
                    s["conversations"],
                    s["recovered"],
                    s["all_recovered_s"] if s["all_recovered_s"] is not None else "not all",
                    r["p50"],
                    r["p99"],
                    s["sent"],
                    s["acked"],
                    s["lost"],
                    s["duplicated"],
                    s["reordered"],
                ]
            ],
        ),
        "",
        f"subscribed before the kill: {s['subscribed_before_kill']:,} (first connect + sub "
        f"{s['first_connect_s']} s); jitter base {data['params']['jitter_ms']} ms; reconnect "
        f"attempts p50/max {s['reconnect_attempts']['p50']}/{s['reconnect_attempts']['max']}; "
        f"reconnect errors {s['reconnect_errors'] or 'none'}; send errors "
        f"{s['send_errors'] or 'none'}; gateway B CPU during the storm "
        f"{s['gateway_b_cpu_s_during_storm']} s.",
        "",
        f"CPU during the storm (cores): {s['cpu_during_storm']}",
        "",
        f"- zero lost: {verdict(data['targets']['zero_lost']['reached'])}",
    ]
    if data.get("profile"):
        lines += ["", "Gateway B profile during the storm:", "", render_profile(data["profile"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--members", type=int, default=100, help="members per conversation (<=1000)")
    p.add_argument("--rate", type=float, default=50.0, help="total messages/s during the run")
    p.add_argument("--body-bytes", type=int, default=40)
    p.add_argument("--jitter-ms", type=int, default=1000, help="backoff base (full jitter)")
    p.add_argument("--cap-ms", type=int, default=10_000)
    p.add_argument("--pre", type=float, default=3.0, help="seconds of traffic before the kill")
    p.add_argument("--post", type=float, default=2.0, help="seconds of traffic after recovery")
    p.add_argument("--limit", type=float, default=120.0, help="most seconds to wait for recovery")
    p.add_argument("--verify-timeout", type=float, default=30.0)
    p.add_argument("--procs", type=int, default=0)
    p.add_argument("--fanout-workers", type=int, default=2)
    p.add_argument("--source-ips", type=int, default=8)
    p.add_argument("--profile", action="store_true", help="py-spy gateway B during the storm")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--experiment", default="", help="bench.experiment patches, e.g. timing")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--results-md", default=str(RESULTS_MD))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = run(args)
    md = Path(args.results_md) if args.results_md else None
    path = write_results(result_name(NAME, args.experiment), data, render(data), Path(args.out), md)
    s = data["summary"]
    print(
        f"reconnect: {s['recovered']}/{s['subscribed_before_kill']} recovered, all in "
        f"{s['all_recovered_s']} s; acked {s['acked']}, lost {s['lost']}, dup "
        f"{s['duplicated']}, reordered {s['reordered']} -> {path}"
    )
    return data


if __name__ == "__main__":
    main()
