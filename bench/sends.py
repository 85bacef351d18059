"""A lone send's gateway CPU, end to end: one gateway, WebSocket `send` frames paced at a
fixed rate, each alone (the next goes when it is due, its ack long back), measured from
the gateway process's CPU (/proc) over the measured sends, less the same process's CPU
over an idle spell as long (its timers: heartbeats, lease renewals).

The whole server side but PostgreSQL goes onto `--server-core` (the gateway, a private
Redis, the private Tansu), like `bench.fanout --pin-server-core`; this process runs on the
other cores. One fan-out worker stores the messages (the warm-up's first sends wait for
that: a fresh Redis); the shard read beside each produce finds nothing, as for any new
message. Prints one JSON line.

    flock /tmp/agora-bench.lock .venv/bin/python -m bench.sends --sends 3000 --rate 250

`--profile FILE` records the gateway with py-spy (raw) during the measured sends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import pin, pin_threads, proc_cpu_s, proc_cpu_split_s, raise_nofile, wait_until
from bench.members import Sender, create_groups
from bench.profile import Profiler
from bench.stack import ALL_CPUS, bench_stack, unique_tag
from bench.wsclient import open_client


async def _paced(senders: list[tuple[Sender, str]], n: int, rate: float, tag: str) -> float:
    """Send `n` lone sends at `rate`, round robin over the senders; the wall time."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        wait = start + i / rate - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        s, conv = senders[i % len(senders)]
        s.send_msg(conv, f"{tag}-{i}", "x" * 48)
    await wait_until(lambda: not any(s.pending for s, _ in senders), 30, 0.01)
    return loop.time() - start


async def _measure(args: argparse.Namespace, stack: Any, gw: Any, pg_cpu: Any) -> dict[str, Any]:
    tag = unique_tag()
    users = [f"s{tag}-{k}" for k in range(args.senders)]
    convs = create_groups(gw.http_url, stack.token, [(u, [u, f"{u}-peer"]) for u in users])
    senders = []
    for u, conv in zip(users, convs, strict=True):
        s = Sender("127.0.0.1", gw.port, stack.token(u), u)
        await open_client(s, "127.0.0.1", gw.port, None, 10)
        senders.append((s, conv))
    await _paced(senders, args.warmup, args.rate, f"w{tag}")
    # The process's own timers, over an idle spell as long as the measured sends.
    spell = args.sends / args.rate
    idle0 = gw.cpu_s()
    await asyncio.sleep(spell)
    idle = gw.cpu_s() - idle0
    profiler = None
    if args.profile:
        profiler = Profiler(gw.pid, Path(args.profile), gil=args.gil).start()
    perf = None
    if args.perf:  # on-CPU samples only (py-spy also counts a preempted gateway as busy)
        perf = subprocess.Popen(  # noqa: ASYNC220 - started once, never waited for here
            ["perf", "record", "-F", "999", "-g", "-p", str(gw.pid), "-o", args.perf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    acked0 = sum(sum(s.acked.values()) for s, _ in senders)
    errors0 = sum(sum(s.errors.values()) for s, _ in senders)
    split0 = proc_cpu_split_s(gw.pid)
    cpu0 = {"gateway": gw.cpu_s(), "tansu": proc_cpu_s(stack.broker.pid), "pg": pg_cpu()}
    if stack.redis is not None:
        cpu0["redis"] = proc_cpu_s(stack.redis.pid)
    wall = await _paced(senders, args.sends, args.rate, f"m{tag}")
    split = proc_cpu_split_s(gw.pid)
    cpu = {"gateway": gw.cpu_s(), "tansu": proc_cpu_s(stack.broker.pid), "pg": pg_cpu()}
    if stack.redis is not None:
        cpu["redis"] = proc_cpu_s(stack.redis.pid)
    prof = profiler.stop() if profiler is not None else None
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
    acked = sum(sum(s.acked.values()) for s, _ in senders)
    errors = sum(sum(s.errors.values()) for s, _ in senders) - errors0
    ack_ms = sorted(ms for s, _ in senders for ms in s.ack_ms[-args.sends :])
    for s, _ in senders:
        s.abort()
    used = {k: cpu[k] - cpu0[k] for k in cpu}
    out: dict[str, Any] = {
        "sends": args.sends,
        "rate": args.rate,
        "wall_s": round(wall, 2),
        "acked": acked - acked0,
        "errors": errors,
        "gateway_us_per_send": round((used["gateway"] - idle * wall / spell) / args.sends * 1e6, 1),
        "gateway_idle_cpu_s": round(idle, 3),
        # user / system: on loopback a write's system part includes the peer's TCP work.
        "gateway_user_sys_us": [
            round((split[0] - split0[0]) / args.sends * 1e6, 1),
            round((split[1] - split0[1]) / args.sends * 1e6, 1),
        ],
        "us_per_send": {k: round(v / args.sends * 1e6, 1) for k, v in used.items()},
        "ack_ms_p50": round(ack_ms[len(ack_ms) // 2], 2) if ack_ms else None,
    }
    if prof is not None:
        out["profile"] = {k: prof.get(k) for k in ("samples", "busy", "file", "error")}
    return out


def main() -> None:
    import uvloop

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sends", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rate", type=float, default=250.0, help="sends per second (one gateway)")
    p.add_argument("--senders", type=int, default=10, help="users, one conversation each")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument(
        "--gateway-alone",
        action="store_true",
        help="the gateway alone on the other core, everything else (this process too) on"
        " --server-core: no wake-up of a peer preempts it (py-spy then samples its CPU)",
    )
    p.add_argument("--profile", default="", help="py-spy raw output file")
    p.add_argument(
        "--gil", action="store_true", help="py-spy --gil: samples holding the GIL (not idle)"
    )
    p.add_argument("--perf", default="", help="perf record -g output file (C and kernel)")
    args = p.parse_args()
    raise_nofile()
    server = {args.server_core}
    with bench_stack(server, {}, server_cpus=server) as stack:
        gw = stack.gateway(f"sends-{unique_tag()}")
        # A fresh Redis makes the first sends wait until their copy is stored (the
        # gateway cannot tell it from one that lost its data: gateway/idempotency.py).
        stack.fanout(f"sends-f-{unique_tag()}")
        if args.gateway_alone:
            pin_threads(gw.pid, (ALL_CPUS - server) or server)
            pin(server)
        else:
            pin((ALL_CPUS - server) or None)
        pg_pid = stack.postgres_pid

        def pg_cpu() -> float:
            from bench.lookups import _pg_cpu_s

            return _pg_cpu_s(pg_pid) if pg_pid else 0.0

        t0 = time.time()
        out = uvloop.run(_measure(args, stack, gw, pg_cpu))
        out["start_utc"] = time.strftime("%H:%M:%S", time.gmtime(t0))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
