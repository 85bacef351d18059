"""Connection storm: N clients connect to one gateway process with at most C in flight.

Measures connected/failed (by reason), connect latency up to the `hello` frame
(p50/p95/p99/max), connections/s, the gateway's RSS per idle connection (VmRSS before vs
after, divided by N), and survivors after a hold (still open and answering a `ping`).

    .venv/bin/python -m bench.storm --clients 10000 --inflight 200
    .venv/bin/python -m bench.storm --clients 19900 --inflight 200 --hold 30   # idle target

The gateway runs on the first core, the load generator (several processes, one event loop
each) on the last; clients connect from several 127.0.0.x source addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
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
FD_RESERVE = 100  # descriptors a gateway process needs besides its client sockets


class IdleClient(WsClient):
    pongs = 0

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

    async def prepare(self, users: list[str], secret: str) -> int:
        from gateway.auth import make_token

        self.tokens = [make_token(secret, u, None, 3600) for u in users]
        return len(self.tokens)

    async def connect(
        self,
        host: str,
        port: int,
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
        ends: list[float] = []
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # all workers start together
        t0 = time.monotonic()
        stop_at = t0 + deadline_s

        async def one(i: int) -> None:
            first_start = 0.0
            for attempt in range(retries + 1):
                async with sem:
                    if time.monotonic() > stop_at:
                        failures["not_attempted_deadline"] += 1
                        return
                    c = IdleClient(host, port, self.tokens[i])
                    ip = source_ips[i % len(source_ips)]
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
                        self.clients.append(c)
                        return
                # docs/protocol.md: back off with jitter after a refusal (out of the in-flight set).
                await asyncio.sleep(random.uniform(0, retry_after))

        await asyncio.gather(*(one(i) for i in range(len(self.tokens))))
        return {
            "connected": len(latencies),
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "refusals": dict(refusals),
            "latencies_ms": latencies,
            "t_start": t0,
            "t_end": max(ends) if ends else t0,
        }

    async def check(self, timeout: float) -> dict[str, Any]:
        """Open clients, and how many answer a ping within `timeout`."""
        open_ = [c for c in self.clients if c.is_open]
        for c in open_:
            c.pongs = 0
            c.send_json({"t": "ping", "rid": 1})
        await wait_until(lambda: all(c.pongs or not c.is_open for c in open_), timeout)
        closed = Counter(str(c.close_code) for c in self.clients if not c.is_open)
        return {
            "open": sum(1 for c in self.clients if c.is_open),
            "answered_ping": sum(1 for c in open_ if c.pongs > 0 and c.is_open),
            "closed_by_code": dict(closed),
        }

    async def close(self) -> int:
        n = len(self.clients)
        for c in self.clients:
            c.abort()
        self.clients.clear()
        await asyncio.sleep(0.1)
        return n


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    nofile = raise_nofile()
    gw_cpus, lg_cpus = cpu_sets()
    procs = args.procs or max(2, math.ceil(args.clients / 5000))
    env = {
        "BENCH_TRACEMALLOC_OUT": str(tracemalloc_path(args)),
        # Many clients share few source addresses here; production peers have their own.
        "AGORA_HANDSHAKES_PER_IP_S": "0",
        "AGORA_MAX_CONNECTIONS": str(max(50_000, args.clients + 1000)),
        "AGORA_HEARTBEAT_MS": str(args.heartbeat_ms),
    }
    tag = unique_tag()
    with bench_stack(gw_cpus, env, experiment=args.experiment) as stack:
        gw = stack.gateway(f"storm-{tag}")
        pin(lg_cpus)  # after the engines started: they keep every core
        pool = WorkerPool("bench.storm:StormWorker", procs, lg_cpus)
        try:
            secret = stack.settings.jwt_secret
            return uvloop.run(_measure(args, secret, gw, pool, tag, nofile, procs))
        finally:
            pool.close()


async def _measure(
    args: argparse.Namespace,
    secret: str,
    gw: BenchProc,
    pool: WorkerPool,
    tag: str,
    nofile: tuple[int, int],
    procs: int,
) -> dict[str, Any]:
    host, port = "127.0.0.1", gw.port or 0
    ips = list(SOURCE_IPS[: args.source_ips])
    per_worker_inflight = max(1, args.inflight // procs)

    # Warm-up: the first connections pay one-off costs (imports, caches) in the gateway.
    warm = [f"w{tag}-{i}" for i in range(min(200, args.clients))]
    await pool.call("prepare", [{"users": u, "secret": secret} for u in split(warm, procs)])
    await pool.call(
        "connect",
        {
            "host": host,
            "port": port,
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
    await pool.call("prepare", [{"users": u, "secret": secret} for u in split(users, procs)])
    tracing = "tracemalloc" in args.experiment
    if tracing:
        os.kill(gw.pid, signal.SIGUSR1)  # baseline snapshot
        await asyncio.sleep(1.0)
    fds_before = fd_count(gw.pid)
    rss_before = gw.rss_kib()
    cpu_before = gw.cpu_s()
    wait_before = gw.sched_s()[1]
    cond = conditions()
    snap = cpu_snapshot()
    t_snap = time.monotonic()
    profiler = (
        Profiler(gw.pid, _profile_path(args, tag), native=args.native).start()
        if args.profile
        else None
    )
    start_at = time.monotonic() + 0.5
    parts = await pool.call(
        "connect",
        {
            "host": host,
            "port": port,
            "inflight": per_worker_inflight,
            "source_ips": ips,
            "timeout": args.timeout,
            "start_at": start_at,
            "deadline_s": args.deadline,
            "retries": args.retries,
        },
    )
    cpu_storm = gw.cpu_s() - cpu_before
    starved = (gw.sched_s()[1] - wait_before) / max(1e-6, time.monotonic() - t_snap)
    machine_cpu = cpu_by_process(
        snap, cpu_snapshot(), time.monotonic() - t_snap, {gw.pid: "gateway (under test)"}
    )
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

    await asyncio.sleep(2.0)  # let the gateway settle (writers idle, buffers released)
    rss_after = gw.rss_kib()
    fds_after = fd_count(gw.pid)
    allocations = ""
    if tracing:
        os.kill(gw.pid, signal.SIGUSR1)
        await asyncio.sleep(15.0)  # a snapshot of a big heap takes a while
        allocations = _read_tracemalloc(args)
    samples = [rss_after]
    hold_until = time.monotonic() + args.hold
    while time.monotonic() < hold_until:
        await asyncio.sleep(min(5.0, max(0.0, hold_until - time.monotonic())))
        samples.append(gw.rss_kib())
    checks = await pool.call("check", {"timeout": 15.0})
    rss_end = gw.rss_kib()
    alive = gw.alive()
    await pool.call("close")

    survivors = sum(c["answered_ping"] for c in checks)
    closed: Counter[str] = Counter()
    for c in checks:
        closed.update(c["closed_by_code"])
    per_conn = (rss_after - rss_before) / connected if connected else 0.0
    summary = {
        "clients": args.clients,
        "inflight": args.inflight,
        "connected": connected,
        "failed": failed,
        "failures": dict(failures),
        "refusals_retried": dict(refusals),
        "connect_ms": percentiles(latencies),
        "elapsed_s": round(elapsed, 3),
        "conns_per_s": round(connected / elapsed, 1),
        "gateway_cpu_s_storm": round(cpu_storm, 2),
        "gateway_cpu_ms_per_conn": round(1000 * cpu_storm / max(1, connected), 3),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_end_of_hold_kib": rss_end,
        "rss_max_during_hold_kib": max(samples),
        "rss_per_conn_kib": round(per_conn, 2),
        "gateway_fds_before": fds_before,
        "gateway_fds_after": fds_after,
        "hold_s": args.hold,
        "open_after_hold": sum(c["open"] for c in checks),
        "survivors": survivors,
        "closed_during_hold": dict(closed),
        "gateway_alive": alive,
        "cpu_during_storm": machine_cpu,
        "gateway_runqueue_wait": round(starved, 2),
        "tracemalloc_top": allocations,
    }
    p99 = summary["connect_ms"]["p99"]
    targets = {
        "storm_10k": {
            "target": "10,000 clients, 200 in flight: 0 failures, >= 1,500 conn/s, p99 < 500 ms",
            "applies": args.clients >= 10_000 and args.inflight <= 200,
            "reached": args.clients >= 10_000
            and failed == 0
            and summary["conns_per_s"] >= 1500
            and p99 < 500,
        },
        "idle_20k": {
            "target": "20,000 idle connections per gateway process at <= 20 KiB RSS each",
            "applies": args.clients >= 15_000,
            "count_reached": connected >= 20_000 and survivors >= 20_000,
            "rss_reached": per_conn <= 20.0 and connected > 0,
            "note": (
                f"RLIMIT_NOFILE hard limit here is {nofile[1]} (setrlimit above it is refused"
                " even for root), so one process cannot hold 20,000 sockets plus its own fds"
                if nofile[1] <= 20_000 + FD_RESERVE
                else ""
            ),
        },
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
            "gateway_pid": gw.pid,
            "nofile": list(nofile),
        },
        "summary": summary,
        "targets": targets,
        "profile": profile,
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
    lines = [
        "### Connection storm (`bench.storm`)" + experiment_note(data),
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
    if data.get("profile"):
        lines += ["", "Gateway profile during the storm:", "", render_profile(data["profile"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--name", default=NAME, help="results name (storm-idle for the idle run)")
    p.add_argument("--inflight", type=int, default=200, help="connects in flight at most")
    p.add_argument("--procs", type=int, default=0, help="load-generator processes (0: auto)")
    p.add_argument("--hold", type=float, default=30.0, help="seconds to hold before the check")
    p.add_argument("--heartbeat-ms", type=int, default=25_000)
    p.add_argument(
        "--retries", type=int, default=3, help="retries after 503/429 (jittered Retry-After)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-connect timeout, s")
    p.add_argument("--deadline", type=float, default=180.0, help="storm time limit, s")
    p.add_argument("--source-ips", type=int, default=8, help=f"1-{len(SOURCE_IPS)}")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway during the storm")
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
        f"{s['rss_per_conn_kib']} KiB/conn, survivors {s['survivors']} -> {path}"
    )
    return data


if __name__ == "__main__":
    main()
