"""Network and process faults on the namespace cluster, each under traffic, each checked.

    python -m bench.clusterfaults                      # every fault, results in RESULTS.md
    python -m bench.clusterfaults --only gw-redis      # one of them

For each fault: traffic from the load-generator host (bench/clusterload.py) for a few
seconds, the fault, held for `--hold-s`, undone, more traffic, then the load generator
drains and the outcome is checked against the shard databases: every acked message stored
once under its acked id, received by every member exactly once, nothing unacked received.
`check` is shared with tests/integration/test_cluster.py.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from bench.cluster import Cluster, Layout, Process
from bench.common import conditions, machine, machine_line, md_table, write_results


@dataclass
class Traffic:
    proc: Process
    out: str
    started: float


def start_traffic(cluster: Cluster, tag: str, per_db: int = 2, interval_ms: int = 100) -> Traffic:
    """The load generator on its host; returns once every client is connected and
    subscribed and sending has begun."""
    work = cluster.workdir / f"load-{tag}"
    work.mkdir()
    ready, out = work / "ready", work / "result.json"
    argv = [sys.executable, "-m", "bench.clusterload", "--out", str(out), "--tag", tag]
    argv += ["--per-db", str(per_db), "--interval-ms", str(interval_ms)]
    argv += ["--ready-file", str(ready)]
    for url in cluster.gateway_urls():
        argv += ["--gateway", url]
    proc = cluster.spawn("loadgen", f"loadgen-{tag}", argv, cluster.agora_env())
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.popen.poll() is not None:
            raise RuntimeError(f"load generator exited early; see {proc.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"load generator not ready in 90 s; see {proc.log}")
        time.sleep(0.1)
    return Traffic(proc, str(out), time.time())


def stop_traffic(cluster: Cluster, traffic: Traffic, timeout: float = 120) -> dict[str, Any]:
    cluster.expected_exits.add(traffic.proc.pid)  # it ends by itself; any other exit is a crash
    traffic.proc.popen.send_signal(signal.SIGUSR1)  # stop sending, drain, write the result
    traffic.proc.popen.wait(timeout)
    if traffic.proc.popen.returncode != 0:
        raise RuntimeError(f"load generator failed: {traffic.proc.log_text()[-3000:]}")
    with open(traffic.out, "rb") as f:
        result: dict[str, Any] = orjson.loads(f.read())
    return result


async def _stored(dsn: str, convs: list[int]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT conv_id, cid, id FROM messages WHERE conv_id = ANY($1::bigint[])", convs
        )
        return rows
    finally:
        await conn.close()


def check(cluster: Cluster, result: dict[str, Any]) -> dict[str, int]:
    """Counts of everything that must be 0 (and of what was acked) for one run."""
    out = dict.fromkeys(
        ("acked", "lost", "delivered_twice", "delivered_unacked", "stored_twice", "wrong_id"), 0
    )
    for c in result["convs"]:
        acked_ids = {a["id"] for a in c["acked"].values()}
        out["acked"] += len(acked_ids)
        for got in c["received"].values():
            ids = {int(i) for i in got}
            out["lost"] += len(acked_ids - ids)
            out["delivered_unacked"] += len(ids - acked_ids)
            out["delivered_twice"] += sum(1 for t in got.values() if len(t) > 1)
    for db, dsn in enumerate(cluster.dsns()):
        convs = [c for c in result["convs"] if c["db"] == db]
        rows = asyncio.run(_stored(dsn, [c["conv"] for c in convs]))
        stored: dict[tuple[int, str], list[int]] = {}
        for r in rows:
            stored.setdefault((r["conv_id"], r["cid"]), []).append(r["id"])
        out["stored_twice"] += sum(1 for v in stored.values() if len(v) > 1)
        for c in convs:
            for cid, a in c["acked"].items():
                if stored.get((c["conv"], cid)) != [a["id"]]:
                    out["wrong_id"] += 1
                    found = stored.get((c["conv"], cid))
                    print(f"not stored as acked: db {db} {c['conv']}/{cid} {a} {found}")
    return out


def delivery_gap_s(result: dict[str, Any], after: float) -> float:
    """The longest time, after `after`, that any receiver went without a message: how
    long the fault interrupted delivery (the sending interval when it did not)."""
    worst = 0.0
    for c in result["convs"]:
        receiver = c["members"][1]
        times = sorted(t for ts in c["received"][receiver].values() for t in ts if t >= after)
        for a, b in itertools.pairwise(times):
            worst = max(worst, b - a)
    return worst


def longest_ack_s(result: dict[str, Any]) -> float:
    """The longest a send waited for its ack (its retries on other gateways included): a
    send in flight on a gateway that died waits for its pending record to be taken over
    (gateway/send.py: PENDING_TAKEOVER_MS), and its conversation's next sends wait on it."""
    return max(
        (a["acked"] - a["sent"] for c in result["convs"] for a in c["acked"].values()),
        default=0.0,
    )


@dataclass
class Fault:
    name: str
    what: str
    inject: Callable[[Cluster], None]
    undo: Callable[[Cluster], None]
    hold_s: float | None = None  # longer than --hold-s when the reaction needs it


_killed: list[str] = []
recovery: dict[str, float] = {}


def _kill_redis(c: Cluster) -> None:
    """Kill a master (the only Redis, without a cluster) by PID; on a cluster, return once
    the cluster serves every slot again (a replica promoted), timing it."""
    host = c.redis_masters()[0] if c.layout.redis_cluster_nodes else "redis"
    _killed.append(host)
    t0 = time.monotonic()
    c.stop(c.find(host), kill=True)
    if not c.layout.redis_cluster_nodes:
        return
    other = next(h for h in c.redis_hosts() if h != host)
    while "cluster_state:ok" in c.redis_cli(other, "cluster", "info"):
        if time.monotonic() - t0 > 10:
            break  # not noticed yet within the node timeout: measured below anyway
        time.sleep(0.05)
    while "cluster_state:ok" not in c.redis_cli(other, "cluster", "info"):
        if time.monotonic() - t0 > 60:
            raise RuntimeError("the Redis Cluster did not recover within 60 s")
        time.sleep(0.05)
    recovery["redis_failover_s"] = round(time.monotonic() - t0, 2)


def _start_redis(c: Cluster) -> None:
    c.start_redis(_killed.pop())


def _stop_pg(c: Cluster) -> None:
    c.stop(c.find("pg2-postgres"))


def _start_pg(c: Cluster) -> None:
    c.start_postgres("pg2")


def _kill_gw(c: Cluster) -> None:
    c.stop(c.find("gw1"), kill=True)


def _start_gw(c: Cluster) -> None:
    c.start_gateway("gw1")


FAULTS = [
    Fault(
        "gw-redis",
        "gateway host gw1 partitioned from Redis",
        lambda c: c.partition_redis("gw1"),
        lambda c: c.heal_redis("gw1"),
        hold_s=25,  # the node sheds its clients after one lease (AGORA_ROUTE_LEASE_S, 15 s)
    ),
    Fault(
        "gw-broker",
        "gateway host gw1 partitioned from the broker",
        lambda c: c.partition("gw1", "broker"),
        lambda c: c.heal("gw1", "broker"),
    ),
    Fault(
        "worker-pg",
        "worker host partitioned from PostgreSQL host pg2",
        lambda c: c.partition("worker1", "pg2"),
        lambda c: c.heal("worker1", "pg2"),
    ),
    Fault("pg-restart", "PostgreSQL host pg2 stopped, then started", _stop_pg, _start_pg),
    Fault(
        "pg-kill",
        "PostgreSQL host pg2 crashed (every process SIGKILLed), then started (crash recovery)",
        lambda c: c.kill_host("pg2"),
        _start_pg,
    ),
    Fault("gw-kill", "gateway gw1 killed (SIGKILL), then started again", _kill_gw, _start_gw),
    Fault(
        "gw-loss",
        "5 % packet loss on gw1's link (both ways)",
        lambda c: c.loss("gw1", 5),
        lambda c: c.clear_loss("gw1"),
    ),
    Fault(
        "redis-kill",
        "a Redis master killed by PID (the only Redis, without a cluster), started again",
        _kill_redis,
        _start_redis,
    ),
]


def run_fault(cluster: Cluster, fault: Fault, hold_s: float, settle_s: float) -> dict[str, Any]:
    traffic = start_traffic(cluster, fault.name)
    time.sleep(settle_s)
    t0 = time.time()
    recovery.clear()
    fault.inject(cluster)
    time.sleep(fault.hold_s or hold_s)
    t1 = time.time()
    fault.undo(cluster)
    time.sleep(settle_s)
    result = stop_traffic(cluster, traffic)
    counts = check(cluster, result)
    if counts["wrong_id"] or counts["lost"]:
        time.sleep(15)  # late, or lost? Look again.
        late = check(cluster, result)
        counts["still_missing_15s_later"] = late["wrong_id"]
    moved = sum(1 for n in result["connects"].values() if n > 1)
    return {
        "fault": fault.name,
        "what": fault.what,
        "held_s": round(t1 - t0, 1),
        **counts,
        "clients_reconnected": moved,
        **recovery,
        "longest_delivery_gap_s": round(delivery_gap_s(result, traffic.started), 2),
        "longest_ack_s": round(longest_ack_s(result), 2),
        "crashes": cluster.crashed(),
        "ok": not any(counts[k] for k in counts if k != "acked") and not cluster.crashed(),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.clusterfaults", description=__doc__)
    p.add_argument("--only", action="append", help="fault name (repeatable)")
    p.add_argument("--hold-s", type=float, default=8)
    p.add_argument("--settle-s", type=float, default=3)
    p.add_argument("--gateways", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--redis-cluster", action="store_true", help="3 masters + 3 replicas")
    args = p.parse_args()
    chosen = [f for f in FAULTS if not args.only or f.name in args.only]
    runs: list[dict[str, Any]] = []
    layout = Layout(
        gateways=args.gateways,
        workers=args.workers,
        redis_cluster_nodes=6 if args.redis_cluster else 0,
        prefix="agcf",
    )
    with Cluster(layout) as cluster:
        for fault in chosen:
            run = run_fault(cluster, fault, args.hold_s, args.settle_s)
            print(orjson.dumps(run).decode(), flush=True)
            runs.append(run)
        topology = cluster.describe()
    m, cond = machine(), conditions()
    flag = " --redis-cluster" if args.redis_cluster else ""
    rows = [
        [
            r["what"],
            r["held_s"],
            r["acked"],
            r["lost"],
            r["delivered_twice"],
            r["stored_twice"] + r["wrong_id"],
            r["clients_reconnected"],
            r["longest_delivery_gap_s"],
            r["longest_ack_s"],
            r.get("redis_failover_s", "-"),
            "ok" if r["ok"] else "FAIL " + "; ".join(r["crashes"]),
        ]
        for r in runs
    ]
    headers = ["fault", "held s", "acked", "lost", "delivered twice", "stored wrong"]
    headers += ["clients moved", "longest gap s", "longest ack s", "failover s", "verdict"]
    block = "\n".join(
        [
            f"### Faults on the namespace cluster (`python -m bench.clusterfaults{flag}`)",
            "",
            machine_line(m, cond),
            "",
            f"Hosts: {', '.join(f'{n} {ip}' for n, ip in topology['hosts'].items())}; "
            f"link delay: {topology['delay_ms_each_way']} ms each way"
            + (f" ({topology['delay_note']})" if topology["delay_note"] else "")
            + ".",
            "",
            "'longest gap': the longest any receiver went without a message; 'longest ack': "
            "the longest a send waited for its ack, retries on other gateways included.",
            "",
            md_table(headers, rows),
        ]
    )
    write_results(
        "clusterfaults-redis-cluster" if args.redis_cluster else "clusterfaults",
        {"command": " ".join(sys.argv), "machine": m, "conditions": cond, "runs": runs},
        block,
    )


if __name__ == "__main__":
    main()
