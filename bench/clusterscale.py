"""Scale on the namespace cluster: the same traffic with 1, 2 and 3 gateway hosts and 1 and 2
worker hosts, CPU per host role per message.

    python -m bench.clusterscale [--per-db 10 --interval-ms 50 --seconds 20]

On one 2-core machine the totals cannot grow with hosts; what this shows is the cost of a
message per process (gateway, worker, Redis, broker, PostgreSQL host), measured as CPU
seconds of every process inside each host's network namespace over a steady window, and
whether it stays flat as hosts are added (nothing serialises on one component). Each run
is checked like the fault runs: 0 acked messages lost or duplicated.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import orjson

from bench.cluster import Cluster, Layout
from bench.clusterfaults import check, start_traffic, stop_traffic
from bench.common import (
    conditions,
    machine,
    machine_line,
    md_table,
    percentiles,
    proc_sched_s,
    write_results,
)

SHAPES = [(1, 1), (2, 1), (3, 1), (3, 2)]


def host_sched_s(ns: str) -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a core) of every process now inside
    namespace `ns`, over all their threads."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    pairs = [proc_sched_s(int(p)) for p in pids.split()]
    return sum(r for r, _ in pairs), sum(w for _, w in pairs)


def snapshot(cluster: Cluster) -> dict[str, tuple[float, float]]:
    return {name: host_sched_s(h.ns) for name, h in cluster.hosts.items()}


def role(host: str) -> str:
    for prefix in ("gw", "worker", "pg"):
        if host.startswith(prefix):
            return prefix
    return host


def run_shape(gateways: int, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    layout = Layout(gateways=gateways, workers=workers, prefix="agcs", subnet="10.77.2")
    with Cluster(layout) as cluster:
        traffic = start_traffic(cluster, f"s{gateways}{workers}", args.per_db, args.interval_ms)
        time.sleep(2)
        before, t0 = snapshot(cluster), time.monotonic()
        time.sleep(args.seconds)
        after, t1 = snapshot(cluster), time.monotonic()
        load1 = os.getloadavg()[0]
        result = stop_traffic(cluster, traffic)
        counts = check(cluster, result)
        if counts["wrong_id"] or counts["lost"]:
            time.sleep(15)  # late, or lost? Look again.
            counts["still_missing_15s_later"] = check(cluster, result)["wrong_id"]
        crashes = cluster.crashed()
    window = t1 - t0
    in_window = [
        a
        for c in result["convs"]
        for a in c["acked"].values()
        if traffic.started + 2 <= a["acked"] <= traffic.started + 2 + window
    ]
    acked_in_window = len(in_window)
    rate = acked_in_window / window
    # The senders are closed loops (the next message `interval` after each ack), so the
    # rate is senders / (interval + ack latency): a slow ack, not a slow worker, lowers it.
    ack_ms = percentiles([1000 * (a["acked"] - a["sent"]) for a in in_window])
    by_role: dict[str, list[float]] = {}
    for host in before:
        by_role.setdefault(role(host), []).append(after[host][0] - before[host][0])
    waited = sum(after[h][1] - before[h][1] for h in before) / window
    per_msg_ms = {
        r: round(1000 * (sum(v) / len(v)) / max(acked_in_window, 1), 3) for r, v in by_role.items()
    }
    cores = {r: round(sum(v) / window, 3) for r, v in by_role.items()}
    return {
        "gateways": gateways,
        "workers": workers,
        "msgs_per_s": round(rate, 1),
        "deliveries_per_s": round(2 * rate, 1),
        "cpu_ms_per_msg_per_host": per_msg_ms,
        "cores_by_role": cores,
        "ack_ms": ack_ms,
        "cluster_cores_used": round(sum(sum(v) for v in by_role.values()) / window, 2),
        "cluster_runqueue_wait_cores": round(waited, 2),
        "load1": round(load1, 2),
        **counts,
        "crashes": crashes,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.clusterscale", description=__doc__)
    p.add_argument("--per-db", type=int, default=10, help="conversations per PG host")
    p.add_argument("--interval-ms", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--shape", action="append", help="GATEWAYSxWORKERS, e.g. 3x2 (repeatable)")
    args = p.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shape] if args.shape else SHAPES
    runs = []
    for gateways, workers in shapes:
        run = run_shape(gateways, workers, args)
        print(orjson.dumps(run).decode(), flush=True)
        runs.append(run)
    m, cond = machine(), conditions()
    roles = ["gw", "worker", "redis", "broker", "pg", "loadgen"]
    rows = [
        [
            f"{r['gateways']} gw, {r['workers']} worker",
            r["msgs_per_s"],
            f"{r['ack_ms']['p50']:.0f} / {r['ack_ms']['p99']:.0f}",
            r["cluster_cores_used"],
            r["cluster_runqueue_wait_cores"],
            r["load1"],
            *(r["cpu_ms_per_msg_per_host"].get(x, "-") for x in roles),
            f"{r['lost']}/{r['delivered_twice']}/{r['stored_twice'] + r['wrong_id']}",
        ]
        for r in runs
    ]
    headers = ["hosts", "msgs/s", "ack p50 / p99 ms", "cluster cores", "waiting for a core"]
    headers += ["load 1 min", *(f"{x} CPU ms/msg/host" for x in roles), "lost/dup/wrong"]
    block = "\n".join(
        [
            "### Scale on the namespace cluster (`python -m bench.clusterscale`)",
            "",
            machine_line(m, cond),
            "",
            f"{args.per_db} two-member conversations per PostgreSQL host (2 hosts), one "
            f"sender each, a message every {args.interval_ms} ms after each ack; CPU of "
            f"every process in each host's namespace over {args.seconds:.0f} s, per acked "
            "message, averaged over the hosts of a role (each message is delivered twice). "
            "The senders are closed loops, so msgs/s = senders / (interval + ack latency): "
            "a row's rate falls when its acks are slow, and its acks are slow when the "
            "cluster's processes wait for a core ('waiting for a core': cores' worth of "
            "runnable-but-not-running time of every process in the cluster, from schedstat; "
            "'cluster cores': what they used). Link delay: none (this kernel has no "
            "sch_netem).",
            "",
            md_table(headers, rows),
        ]
    )
    write_results(
        "clusterscale",
        {"command": " ".join(sys.argv), "machine": m, "conditions": cond, "runs": runs},
        block,
    )


if __name__ == "__main__":
    main()
