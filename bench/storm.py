"""Connection storm: N clients connect to one gateway process (or to several, with
`--gateways`) with at most C in flight.

Measures connected/failed (by reason), connect latency up to the `hello` frame
(p50/p95/p99/max), connections/s, the gateways' RSS per idle connection (VmRSS before vs
after, divided by N), and survivors after a hold (still open and answering a `ping`).

    .venv/bin/python -m bench.storm --clients 10000 --inflight 200
    .venv/bin/python -m bench.storm --clients 19800 --inflight 200 --hold 30   # per process
    .venv/bin/python -m bench.storm --gateways 6 --clients 100000 --hold 60 --name storm-100k

The gateways run on the first core, the load generator (several processes, one event loop
each) on the last; clients connect from several 127.0.0.x source addresses. With several
gateways, client i goes to gateway i % N (bench/gateways.py spreads them so that no process
passes its fd limit and no (source ip, gateway port) pair its ephemeral ports).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import gateways
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
    verdict,
    wait_until,
    write_results,
)
from bench.loadgen import WorkerPool, split
from bench.profile import Profiler
from bench.profile import render as render_profile
from bench.stack import BenchProc, bench_stack, unique_tag
from bench.wsclient import ClosedBeforeHello, HandshakeError, WsClient, open_client

NAME = "storm"


class IdleClient(WsClient):
    pongs = 0
    gateway = 0  # index of the gateway it connects to

    def on_frame(self, payload: bytes) -> None:
        if b'"pong"' in payload:
            self.pongs += 1


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, HandshakeError):
        return f"http_{exc.status}"
    if isinstance(exc, ClosedBeforeHello):
        return f"closed_{exc.code}_before_hello"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}:{os.strerror(exc.errno)}"
    return type(exc).__name__


class StormWorker:
    """Runs in a load-generator process: holds its share of the clients."""

    def __init__(self) -> None:
        self.clients: list[IdleClient] = []
        self.tokens: list[str] = []
        self.slots: list[tuple[int, int]] = []  # (gateway index, source-ip index) per token

    async def prepare(
        self, users: list[str], secret: str, slots: list[tuple[int, int]] | None = None
    ) -> int:
        from gateway.auth import make_token

        self.tokens = [make_token(secret, u, None, 3600) for u in users]
        self.slots = list(slots) if slots else [(0, i) for i in range(len(users))]
        return len(self.tokens)

    async def connect(
        self,
        host: str,
        ports: list[int],
        inflight: int,
        source_ips: list[str],
        timeout: float,
        start_at: float,
        deadline_s: float,
        retries: int = 0,
    ) -> dict[str, Any]:
        sem = asyncio.Semaphore(max(1, inflight))
        refusals: Counter[str] = Counter()
        latencies: list[float] = []
        failures: Counter[str] = Counter()
        per_gateway = [0] * len(ports)
        ends: list[float] = []
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # all workers start together
        t0 = time.monotonic()
        stop_at = t0 + deadline_s

        async def one(i: int) -> None:
            first_start = 0.0
            gw, ip_index = self.slots[i]
            port = ports[gw]
            ip = source_ips[ip_index % len(source_ips)]
            for attempt in range(retries + 1):
                async with sem:
                    if time.monotonic() > stop_at:
                        failures["not_attempted_deadline"] += 1
                        return
                    c = IdleClient(host, port, self.tokens[i])
                    c.gateway = gw
                    try:
                        await open_client(c, host, port, ip, timeout)
                    except HandshakeError as exc:
                        first_start = first_start or c.t_start
                        refusals[f"http_{exc.status}"] += 1
                        if exc.status not in (429, 503) or attempt == retries:
                            failures[failure_reason(exc)] += 1
                            return
                        retry_after = float(exc.retry_after or 1)
                    except Exception as exc:
                        failures[failure_reason(exc)] += 1
                        return
                    else:
                        first_start = first_start or c.t_start
                        latencies.append((c.t_hello - first_start) * 1000)
                        ends.append(c.t_hello)
                        per_gateway[gw] += 1
                        self.clients.append(c)
                        return
                # docs/protocol.md: back off with jitter after a refusal (out of the in-flight set).
                await asyncio.sleep(random.uniform(0, retry_after))

        await asyncio.gather(*(one(i) for i in range(len(self.tokens))))
        return {
            "connected": len(latencies),
            "connected_per_gateway": per_gateway,
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "refusals": dict(refusals),
            "latencies_ms": latencies,
            "t_start": t0,
            "t_end": max(ends) if ends else t0,
        }

    async def check(self, timeout: float, gateways: int = 1) -> dict[str, Any]:
        """Open clients, and how many answer a ping within `timeout` (also per gateway)."""
        open_ = [c for c in self.clients if c.is_open]
        for c in open_:
            c.pongs = 0
            c.send_json({"t": "ping", "rid": 1})
        await wait_until(lambda: all(c.pongs or not c.is_open for c in open_), timeout)
        closed = Counter(str(c.close_code) for c in self.clients if not c.is_open)
        answered = [0] * gateways
        for c in open_:
            if c.pongs > 0 and c.is_open:
                answered[c.gateway] += 1
        return {
            "open": sum(1 for c in self.clients if c.is_open),
            "answered_ping": sum(answered),
            "answered_per_gateway": answered,
            "closed_by_code": dict(closed),
        }

    async def close(self, rate: float = 0.0) -> int:
        """Abort every client: all at once, or `rate` per second in slices of 0.1 s."""
        n = len(self.clients)
        step = max(1, int(rate / 10)) if rate > 0 else n or 1
        for start in range(0, n, step):
            for c in self.clients[start : start + step]:
                c.abort()
            if rate > 0:
                await asyncio.sleep(0.1)
        self.clients.clear()
        await asyncio.sleep(0.1)
        return n


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    nofile = raise_nofile()
    gw_cpus, lg_cpus = cpu_sets()
    ips = list(SOURCE_IPS[: args.source_ips])
    try:
        layout = gateways.plan(args.clients, args.gateways, len(ips), args.procs, nofile[0])
    except ValueError as exc:
        raise SystemExit(f"bench.storm: {exc}") from None
    env = {
        "BENCH_TRACEMALLOC_OUT": str(tracemalloc_path(args)),
        # Many clients share few source addresses here; production peers have their own.
        "AGORA_HANDSHAKES_PER_IP_S": "0",
        "AGORA_MAX_CONNECTIONS": str(max(50_000, layout.per_gateway + 1000)),
        "AGORA_HEARTBEAT_MS": str(args.heartbeat_ms),
    }
    tag = unique_tag()
    data: dict[str, Any] = {}
    gws: list[BenchProc] = []
    try:
        with bench_stack(gw_cpus, env, experiment=args.experiment) as stack:
            # One at a time: each waits for its /healthz before the next starts.
            for g in range(args.gateways):
                gws.append(stack.gateway(f"storm-{tag}-{g}"))
            pin(lg_cpus)  # after the engines started: they keep every core
            pool = WorkerPool("bench.storm:StormWorker", layout.procs, lg_cpus)
            try:
                secret = stack.settings.jwt_secret
                data = uvloop.run(
                    _measure(args, secret, gws, pool, tag, nofile, layout, ips, stack.settings)
                )
            finally:
                pool.close()
    except RuntimeError as exc:
        if not data:
            raise
        # The measurement is done: what a gateway logged is kept with it, and main() still
        # fails the run.
        data["stack_errors"] = str(exc)[:20_000]
    for g, gw in enumerate(gws):  # what each gateway logged from the close to its exit
        row = data["summary"]["per_gateway"][g]
        total = gateways.log_levels(gw.log_text())
        before = row["logged_before_close"]
        row["logged_in_teardown"] = {k: v - before.get(k, 0) for k, v in total.items()}
        row["logged_in_teardown"] = {k: v for k, v in row["logged_in_teardown"].items() if v}
    return data


async def _measure(
    args: argparse.Namespace,
    secret: str,
    gws: list[BenchProc],
    pool: WorkerPool,
    tag: str,
    nofile: tuple[int, int],
    layout: gateways.Plan,
    ips: list[str],
    settings: Any = None,
) -> dict[str, Any]:
    host, ports = "127.0.0.1", [gw.port or 0 for gw in gws]
    procs = layout.procs
    per_worker_inflight = max(1, args.inflight // procs)
    gw_pids = [gw.pid for gw in gws]

    # Warm-up: the first connections pay one-off costs (imports, caches) in each gateway.
    n_warm = min(max(200, 50 * len(gws)), args.clients)
    warm = [f"w{tag}-{i}" for i in range(n_warm)]
    warm_slots = [(i % len(gws), i) for i in range(n_warm)]
    await pool.call(
        "prepare",
        [
            {"users": u, "secret": secret, "slots": s}
            for u, s in zip(split(warm, procs), split(warm_slots, procs), strict=True)
        ],
    )
    await pool.call(
        "connect",
        {
            "host": host,
            "ports": ports,
            "inflight": 20,
            "source_ips": ips,
            "timeout": args.timeout,
            "start_at": 0.0,
            "deadline_s": 60.0,
        },
    )
    await pool.call("close")
    await asyncio.sleep(2.0)

    users = [f"s{tag}-{i}" for i in range(args.clients)]
    await pool.call(
        "prepare",
        [
            {"users": users[w::procs], "secret": secret, "slots": layout.for_proc(w)}
            for w in range(procs)
        ],
    )
    tracing = "tracemalloc" in args.experiment
    if tracing:
        os.kill(gws[0].pid, signal.SIGUSR1)  # baseline snapshot (the first gateway's)
        await asyncio.sleep(1.0)
    before = gateways.read(gw_pids, pss=True)
    lg_before = gateways.cpu_s(pool.pids)
    wait_before = [gw.sched_s()[1] for gw in gws]
    cond = conditions()
    snap = cpu_snapshot()
    t_snap = time.monotonic()
    profiler = (
        Profiler(gws[0].pid, _profile_path(args, tag), native=args.native).start()
        if args.profile
        else None
    )
    timeline = {"storm": _utc()}
    start_at = time.monotonic() + 0.5
    parts = await pool.call(
        "connect",
        {
            "host": host,
            "ports": ports,
            "inflight": per_worker_inflight,
            "source_ips": ips,
            "timeout": args.timeout,
            "start_at": start_at,
            "deadline_s": args.deadline,
            "retries": args.retries,
        },
    )
    stormed = gateways.read(gw_pids)
    timeline["storm_end"] = _utc()
    lg_storm = gateways.cpu_s(pool.pids) - lg_before
    storm_s = max(1e-6, time.monotonic() - t_snap)
    starved = [(gw.sched_s()[1] - w) / storm_s for gw, w in zip(gws, wait_before, strict=True)]
    labels = {pid: "gateway (under test)" for pid in gw_pids}
    machine_cpu = cpu_by_process(snap, cpu_snapshot(), storm_s, labels)
    profile = profiler.stop() if profiler else None
    latencies = [x for p in parts for x in p["latencies_ms"]]
    connected = sum(p["connected"] for p in parts)
    failed = sum(p["failed"] for p in parts)
    failures: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    for p in parts:
        failures.update(p["failures"])
        refusals.update(p["refusals"])
    t_start = min(p["t_start"] for p in parts)
    t_end = max(p["t_end"] for p in parts)
    elapsed = max(1e-6, t_end - t_start)

    await asyncio.sleep(2.0)  # let the gateways settle (writers idle, buffers released)
    after = gateways.read(gw_pids, pss=True)
    allocations = ""
    if tracing:
        os.kill(gws[0].pid, signal.SIGUSR1)
        await asyncio.sleep(15.0)  # a snapshot of a big heap takes a while
        allocations = _read_tracemalloc(args)
    # The hold: every 5 s the gateways' RSS together (the idle target bounds the total).
    samples = [sum(r.rss_kib for r in after)]
    timeline["hold"] = _utc()
    lg_hold_before = gateways.cpu_s(pool.pids)
    t_hold = time.monotonic()
    hold_until = t_hold + args.hold
    while time.monotonic() < hold_until:
        await asyncio.sleep(min(5.0, max(0.0, hold_until - time.monotonic())))
        samples.append(sum(r.rss_kib for r in gateways.read(gw_pids)))
    held = gateways.read(gw_pids)
    lg_hold = gateways.cpu_s(pool.pids) - lg_hold_before
    hold_s = time.monotonic() - t_hold
    timeline["check"] = _utc()
    checks = await pool.call("check", {"timeout": args.check_timeout, "gateways": len(gws)})
    end = gateways.read(gw_pids, pss=True)
    alive = [gw.alive() for gw in gws]
    logged = [gateways.log_levels(gw.log_text()) for gw in gws]  # before the teardown
    problems = [p for gw in gws for p in gw.problems()]  # an ERROR while held fails the run
    # The teardown is not what this bench measures, and thousands of clients leaving one
    # gateway at once queue as many detaches (session counts, routes, presence) on its
    # Redis pool, which can starve its lease renewal until it sheds (bench/RESULTS.md,
    # issue 14 target 6): that ERROR is counted in the results, not taken for a failure.
    for gw in gws:
        gw.expected.append(TEARDOWN_SHED)
    timeline["close"] = _utc()
    cpu_close = gateways.cpu_s(gw_pids)
    redis_cmds = await _redis_commands(settings) if settings else 0
    t_close = time.monotonic()
    await pool.call("close", {"rate": args.close_rate / procs})
    close_s = time.monotonic() - t_close
    # What the teardown left counted (bench/RESULTS.md, issue 14: a lost decrement
    # over-counts a user's sessions for up to a day), waited for up to 20 s.
    sessions_after = await _sessions_after(settings, users, 20.0) if settings else {}
    if settings:
        # Until the counts were 0: the detaches' cost (presence's grace comes later).
        sessions_after["gateway_cpu_s"] = round(gateways.cpu_s(gw_pids) - cpu_close, 2)
        done = await _redis_commands(settings) - redis_cmds
        # Less the bench's own reads (each poll reads every user's hash; one INFO).
        sessions_after["redis_commands"] = done - sessions_after.pop("reads") - 1
    timeline["close_end"] = _utc()

    survivors = sum(c["answered_ping"] for c in checks)
    closed: Counter[str] = Counter()
    for c in checks:
        closed.update(c["closed_by_code"])
    per_gw_connected = [sum(p["connected_per_gateway"][g] for p in parts) for g in range(len(gws))]
    per_gw_answered = [sum(c["answered_per_gateway"][g] for c in checks) for g in range(len(gws))]
    rss_before = sum(r.rss_kib for r in before)
    rss_after = sum(r.rss_kib for r in after)
    per_conn = (rss_after - rss_before) / connected if connected else 0.0
    cpu_storm = sum(s.cpu_s - b.cpu_s for s, b in zip(stormed, before, strict=True))
    per_gateway = [
        {
            "pid": gw.pid,
            "port": gw.port,
            "connected": per_gw_connected[g],
            "answered_ping": per_gw_answered[g],
            "fds_before": before[g].fds,
            "fds_after": after[g].fds,
            "rss_before_kib": before[g].rss_kib,
            "rss_after_kib": after[g].rss_kib,
            "rss_end_of_hold_kib": end[g].rss_kib,
            "pss_end_of_hold_kib": end[g].pss_kib,
            "rss_per_conn_kib": round(
                (after[g].rss_kib - before[g].rss_kib) / max(1, per_gw_connected[g]), 2
            ),
            "cpu_s_storm": round(stormed[g].cpu_s - before[g].cpu_s, 2),
            "cpu_s_hold": round(held[g].cpu_s - after[g].cpu_s, 2),
            "runqueue_wait": round(starved[g], 2),
            "alive": alive[g],
            "logged_before_close": logged[g],
        }
        for g, gw in enumerate(gws)
    ]
    summary = {
        "clients": args.clients,
        "inflight": args.inflight,
        "gateways": len(gws),
        "loadgen_procs": procs,
        "source_ips": len(ips),
        "most_per_4tuple_space": layout.per_tuple,
        "connected": connected,
        "failed": failed,
        "failures": dict(failures),
        "refusals_retried": dict(refusals),
        "connect_ms": percentiles(latencies),
        "elapsed_s": round(elapsed, 3),
        "conns_per_s": round(connected / elapsed, 1),
        "gateway_cpu_s_storm": round(cpu_storm, 2),
        "gateway_cpu_ms_per_conn": round(1000 * cpu_storm / max(1, connected), 3),
        "gateway_cpu_s_hold": round(sum(g["cpu_s_hold"] for g in per_gateway), 2),
        "loadgen_cpu_s_storm": round(lg_storm, 2),
        "loadgen_cpu_s_hold": round(lg_hold, 2),
        "storm_wall_s": round(storm_s, 2),
        "measured_hold_s": round(hold_s, 1),
        "close_s": round(close_s, 1),
        "close_rate": args.close_rate,
        "sessions_after_close": sessions_after,
        # Totals over the gateways (with one gateway: that gateway's own readings).
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_end_of_hold_kib": sum(r.rss_kib for r in end),
        "rss_max_during_hold_kib": max(samples),
        "pss_end_of_hold_kib": sum(r.pss_kib for r in end),
        "rss_per_conn_kib": round(per_conn, 2),
        "gateway_fds_before": sum(r.fds for r in before),
        "gateway_fds_after": sum(r.fds for r in after),
        "hold_s": args.hold,
        "open_after_hold": sum(c["open"] for c in checks),
        "survivors": survivors,
        "closed_during_hold": dict(closed),
        "gateway_alive": all(alive),
        "cpu_during_storm": machine_cpu,
        "gateway_runqueue_wait": round(max(starved), 2),
        "per_gateway": per_gateway,
        "timeline_utc": timeline,
        "gateway_problems_before_close": [p[:500] for p in problems[:20]],
        "tracemalloc_top": allocations,
    }
    return {
        "bench": args.name,
        "command": command_line(),
        "machine": machine(),
        "conditions": cond,
        "conditions_end": conditions(),
        "params": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "results_md", "name")},
            "procs": procs,
            "source_ips": ips,
            "gateway_pids": gw_pids,
            "nofile": list(nofile),
        },
        "summary": summary,
        "targets": _targets(args, summary, nofile),
        "profile": profile,
    }


TEARDOWN_SHED = re.compile(r"Redis unreachable for [\d.]+ s; closing \d+ connections")


def _utc() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


IDLE_100K_RSS_KIB = 1 << 20  # issue 14 target 6: the gateways' RSS together <= 1 GiB


def _targets(
    args: argparse.Namespace, s: dict[str, Any], nofile: tuple[int, int]
) -> dict[str, Any]:
    connected, survivors, failed = s["connected"], s["survivors"], s["failed"]
    per_conn = s["rss_per_conn_kib"]
    return {
        "storm_10k": {
            "target": "10,000 clients, 200 in flight: 0 failures, >= 1,500 conn/s, p99 < 500 ms",
            "applies": args.clients >= 10_000 and args.inflight <= 200,
            "reached": args.clients >= 10_000
            and failed == 0
            and s["conns_per_s"] >= 1500
            and s["connect_ms"]["p99"] < 500,
        },
        "idle_20k": {
            "target": "20,000 idle connections per gateway process at <= 20 KiB RSS each",
            "applies": args.clients >= 15_000 and args.gateways == 1,
            "count_reached": connected >= 20_000 and survivors >= 20_000,
            "rss_reached": per_conn <= 20.0 and connected > 0,
            "note": (
                f"RLIMIT_NOFILE hard limit here is {nofile[1]} (setrlimit above it is refused"
                " even for root), so one process cannot hold 20,000 sockets plus its own fds"
                if nofile[1] <= 20_000 + gateways.FD_RESERVE
                else ""
            ),
        },
        "idle_100k": {
            "target": (
                "100,000 idle connections on one machine (several gateway processes), all "
                "held 60 s, gateway RSS <= 1 GiB in total (issue 14, target 6)"
            ),
            "applies": args.clients >= 100_000,
            "count_reached": connected >= 100_000 and survivors >= 100_000 and failed == 0,
            "held_60s": args.hold >= 60 and survivors == connected,
            "rss_reached": s["rss_max_during_hold_kib"] <= IDLE_100K_RSS_KIB
            and s["rss_end_of_hold_kib"] <= IDLE_100K_RSS_KIB,
        },
    }


def tracemalloc_path(args: argparse.Namespace) -> Path:
    return (Path(args.out) / f"{NAME}-{args.clients}-tracemalloc.txt").resolve()


def _read_tracemalloc(args: argparse.Namespace) -> str:
    path = tracemalloc_path(args)
    return path.read_text() if path.exists() else "(no tracemalloc output)"


def _profile_path(args: argparse.Namespace, tag: str) -> Path:
    return Path(args.out) / f"{NAME}-{args.clients}-profile.txt"


HEADERS = ["clients", "in flight", "connected", "failed", "conn/s", "p50 ms", "p95 ms"]
HEADERS += ["p99 ms", "max ms", "gw CPU ms/conn"]


def render(data: dict[str, Any]) -> str:
    s = data["summary"]
    c = s["connect_ms"]
    t = data["targets"]
    n = s.get("gateways", 1)
    title = "### Connection storm (`bench.storm`)"
    if n > 1:
        title = f"### Connection storm over {n} gateway processes (`bench.storm --gateways`)"
    lines = [
        title + experiment_note(data),
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
                    s["inflight"],
                    s["connected"],
                    s["failed"],
                    s["conns_per_s"],
                    c["p50"],
                    c["p95"],
                    c["p99"],
                    c["max"],
                    s["gateway_cpu_ms_per_conn"],
                ]
            ],
        ),
        "",
        f"failures: {s['failures'] or 'none'}; refusals retried (503/429 with jittered "
        f"Retry-After, latency counted from the first attempt): "
        f"{s['refusals_retried'] or 'none'}; gateway RSS {s['rss_before_kib']:,} KiB before, "
        f"{s['rss_after_kib']:,} KiB after = **{s['rss_per_conn_kib']} KiB per connection**; "
        f"after a {s['hold_s']} s hold: {s['open_after_hold']:,} open, "
        f"{s['survivors']:,} answered a ping; closed during hold: "
        f"{s['closed_during_hold'] or 'none'}.",
        "",
        f"CPU during the storm (cores): {s['cpu_during_storm']}; the gateway was runnable "
        f"but waiting for its core {100 * s.get('gateway_runqueue_wait', 0):.0f}% of the time.",
        "",
        f"- storm target ({t['storm_10k']['target']}): "
        + (verdict(t["storm_10k"]["reached"]) if t["storm_10k"]["applies"] else "n/a at this N"),
        f"- idle target ({t['idle_20k']['target']}): "
        + (
            f"count {verdict(t['idle_20k']['count_reached'])}, "
            f"RSS {verdict(t['idle_20k']['rss_reached'])}"
            if t["idle_20k"]["applies"]
            else "n/a at this N"
        )
        + (f" ({t['idle_20k']['note']})" if t["idle_20k"]["note"] else ""),
    ]
    if n > 1:
        lines[-2:-2] = _render_gateways(s)
    if t.get("idle_100k", {}).get("applies"):
        i = t["idle_100k"]
        lines.append(
            f"- {i['target']}: count {verdict(i['count_reached'])}, held "
            f"{verdict(i['held_60s'])}, RSS {verdict(i['rss_reached'])}"
        )
    if data.get("profile"):
        what = "Gateway profile" if n == 1 else "Profile of the first gateway"
        lines += ["", f"{what} during the storm:", "", render_profile(data["profile"])]
    return "\n".join(lines)


GW_HEADERS = ["gateway", "connected", "answered ping", "RSS before MiB", "RSS after MiB"]
GW_HEADERS += ["RSS end of hold MiB", "KiB/conn", "CPU s storm", "CPU s hold", "runqueue wait"]


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def _render_gateways(s: dict[str, Any]) -> list[str]:
    """The per-gateway table and the totals (several gateway processes)."""
    rows = [
        [
            f"#{g} (:{r['port']})",
            r["connected"],
            r["answered_ping"],
            _mib(r["rss_before_kib"]),
            _mib(r["rss_after_kib"]),
            _mib(r["rss_end_of_hold_kib"]),
            r["rss_per_conn_kib"],
            r["cpu_s_storm"],
            r["cpu_s_hold"],
            f"{100 * r['runqueue_wait']:.0f}%",
        ]
        for g, r in enumerate(s["per_gateway"])
    ]
    return [
        md_table(GW_HEADERS, rows),
        "",
        f"All {s['gateways']} gateways together: RSS **{_mib(s['rss_end_of_hold_kib']):,} MiB** "
        f"at the end of the hold, after every client's ping (sampled every 5 s while held: "
        f"at most {_mib(s['rss_max_during_hold_kib']):,} MiB; "
        f"{_mib(s['rss_before_kib']):,} MiB before the storm; PSS at the end "
        f"{_mib(s['pss_end_of_hold_kib']):,} MiB), {s['rss_per_conn_kib']} KiB per connection; "
        f"gateway CPU {s['gateway_cpu_s_storm']} s for the storm "
        f"({s['gateway_cpu_ms_per_conn']} ms per connection) and {s['gateway_cpu_s_hold']} s "
        f"for the {s['measured_hold_s']} s hold (heartbeats); load generator "
        f"({s['loadgen_procs']} processes, {s['source_ips']} source addresses, at most "
        f"{s['most_per_4tuple_space']:,} connections per (source ip, gateway port)) CPU "
        f"{s['loadgen_cpu_s_storm']} s for the storm and {s['loadgen_cpu_s_hold']} s for "
        f"the hold; the storm took {s['elapsed_s']} s from the first connect to the last "
        "hello.",
        "",
        f"Timeline (UTC): {s['timeline_utc']}. Gateway log lines (WARNING/ERROR) before the "
        f"teardown: {[r['logged_before_close'] for r in s['per_gateway']]}; from the close "
        f"of every client (rate {s.get('close_rate') or 'all at once'}) to the gateways' "
        f"exit: {[r.get('logged_in_teardown', {}) for r in s['per_gateway']]}. Sessions "
        f"still counted after the close: {s.get('sessions_after_close', {})}.",
        "",
    ]


async def _redis_commands(settings: Any) -> int:
    """Commands the stack's Redis has processed (INFO stats), the bench's reads included."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        return int((await r.info("stats"))["total_commands_processed"])
    finally:
        await r.aclose()


async def _sessions_after(settings: Any, users: list[str], seconds: float) -> dict[str, Any]:
    """The storm users' session counts in Redis once the clients are gone: polled until
    every one is 0 or `seconds` passed. {counted: sessions still counted, users: how many
    users have a count other than 0, zero_after_s: when all were 0 (None: not within `seconds`)}."""
    import redis.asyncio as aioredis

    from storage.redis_keys import RedisKeys

    keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
    r = aioredis.Redis.from_url(settings.redis_url)
    t0 = time.monotonic()
    reads = 0
    try:
        while True:
            counted = over = 0
            for i in range(0, len(users), 2000):
                pipe = r.pipeline(transaction=False)
                for user in users[i : i + 2000]:
                    pipe.hgetall(keys.user_sessions(user))
                reads += len(users[i : i + 2000])
                for fields in await pipe.execute():
                    n = sum(int(v) for v in fields.values())
                    counted += n
                    over += n != 0
            waited = time.monotonic() - t0
            if not over or waited >= seconds:
                return {
                    "counted": counted,
                    "users": over,
                    "zero_after_s": round(waited, 1) if not over else None,
                    "reads": reads,
                }
            await asyncio.sleep(0.5)
    finally:
        await r.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--name", default=NAME, help="results name (storm-idle for the idle run)")
    p.add_argument("--inflight", type=int, default=200, help="connects in flight at most")
    p.add_argument("--procs", type=int, default=0, help="load-generator processes (0: auto)")
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateway processes (clients spread round robin; each needs a port and fds)",
    )
    p.add_argument("--hold", type=float, default=30.0, help="seconds to hold before the check")
    p.add_argument("--heartbeat-ms", type=int, default=25_000)
    p.add_argument(
        "--retries", type=int, default=3, help="retries after 503/429 (jittered Retry-After)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-connect timeout, s")
    p.add_argument(
        "--check-timeout", type=float, default=30.0, help="s for every client's ping's pong"
    )
    p.add_argument("--deadline", type=float, default=180.0, help="storm time limit, s")
    p.add_argument(
        "--close-rate",
        type=float,
        default=0.0,
        help="clients closed per second at the end, all processes together (0: all at once)",
    )
    p.add_argument("--source-ips", type=int, default=8, help=f"1-{len(SOURCE_IPS)}")
    p.add_argument(
        "--profile", action="store_true", help="py-spy the (first) gateway during the storm"
    )
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--experiment", default="", help="bench.experiment patches, e.g. timing")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--results-md", default=str(RESULTS_MD), help="'' to leave it alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = run(args)
    md = Path(args.results_md) if args.results_md else None
    path = write_results(
        result_name(args.name, args.experiment), data, render(data), Path(args.out), md
    )
    s = data["summary"]
    print(
        f"storm: {s['connected']}/{s['clients']} connected, {s['failed']} failed "
        f"{s['failures']}, {s['conns_per_s']} conn/s, connect ms {s['connect_ms']}, "
        f"{s['rss_per_conn_kib']} KiB/conn, gateways' RSS {s['rss_end_of_hold_kib']} KiB "
        f"at the end of the hold, survivors {s['survivors']} -> {path}"
    )
    if s.get("gateway_problems_before_close"):
        raise SystemExit(
            "bench.storm: a gateway logged errors before the teardown:\n"
            + "\n".join(s["gateway_problems_before_close"])
        )
    if data.get("stack_errors"):
        raise SystemExit(f"bench.storm: the gateways logged errors:\n{data['stack_errors']}")
    return data


if __name__ == "__main__":
    main()
