"""Moving logical shards to a new PostgreSQL host on the namespace cluster, under traffic.

    python -m bench.clusterreshard [--switch live|fast|serial] [--restart]
                                   [--drain-window-ms 2000]

docs/operations.md's procedure, step by step, while the load generator sends: pin the map
(`0-2047=0,2048-4095=1`, what the equal ranges are), add a host pg3 with a new database
(migrated), copy database 0 into it with PostgreSQL logical replication, fence the moving
range on database 0 (`agora shards fence`), switch every process to
`0-1023=2,1024-2047=0,2048-4095=1`, take the fence down, then `agora shards prune --apply`
on databases 0 and 2. The switch, by `--switch`:

- `live` (the default): "Switch without a restart". Every gateway and worker runs with
  AGORA_SHARD_FILE, one file for the gateways and one for the workers (`Layout.shard_files`);
  pg3's database is appended to both files (processes take it running), and the switch
  waits for the copy to catch up, drops the subscription, writes the new map into the
  gateways' file, waits until every gateway's `/readyz` answers its version, then writes
  the workers' file and waits until each worker logs it. No process restarts; only the
  moving range's deliveries wait (the workers hold its records behind the fence).
- `fast` (`--restart` for short): "Switch with restarts": stop the workers (sends go on:
  they wait in Kafka), wait for the copy, drop the subscription, roll every gateway
  (SIGTERM: its clients move with `since`) and start the workers with the new map,
  overlapping what can overlap safely (`_switch_fast`); `serial` is its first version,
  every step after the other. Deliveries stop for every conversation.

Checked at the end: every acked message stored exactly once across the three databases,
on the one the new map names, under its acked id; every member got every acked message
exactly once. The live run writes RESULTS.md's `clusterreshard` block, a restart run the
`clusterreshard-restart` block, so the two stand side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import asyncpg
import orjson

from bench.cluster import PG_PORT, Cluster, Layout, Process, _wait_log
from bench.clusterfaults import delivery_gap_s, start_traffic, stop_traffic
from bench.common import conditions, machine, machine_line, md_table, write_results
from storage.ids import shard_of_id
from storage.reshard import MOVED_TABLES
from storage.shards import ShardMap, map_version

OLD_MAP = "0-2047=0,2048-4095=1"
NEW_MAP = "0-1023=2,1024-2047=0,2048-4095=1"
MOVED_LAST = 1023  # logical shards 0-1023 move
TABLES = ", ".join(MOVED_TABLES)


async def _sql(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql)
        return rows
    finally:
        await conn.close()


def sql(dsn: str, statement: str) -> list[asyncpg.Record]:
    return asyncio.run(_sql(dsn, statement))


def fingerprint(dsn: str) -> tuple[int, int]:
    counts = (
        "(SELECT count(*) FROM messages), (SELECT coalesce(sum(last_seq), 0) FROM conversations)"
    )
    rows = sql(dsn, f"SELECT {counts}")
    return int(rows[0][0]), int(rows[0][1])


def wait_caught_up(dsn_from: str, dsn_to: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while fingerprint(dsn_to) != fingerprint(dsn_from):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the copy did not catch up within {seconds} s")
        time.sleep(0.1)


def _parallel(calls: Sequence[Callable[[], object]]) -> None:
    with ThreadPoolExecutor(len(calls)) as pool:
        for future in [pool.submit(c) for c in calls]:
            future.result()


def _version(cluster: Cluster, shard_map: str) -> str:
    """The `shard_map` version of the cluster's databases (pg3's included once added) and
    `shard_map`, as `/readyz` and the reload's log line say it."""
    dsns = cluster.dsns()
    return map_version(dsns, ShardMap.parse(shard_map, cluster.layout.logical_shards, len(dsns)))


def _wait_gateways(cluster: Cluster, version: str, seconds: float) -> None:
    """Until every gateway's `/readyz` answers `version` (each re-reads its file once a
    second and keeps its readiness answer for a second)."""
    deadline = time.monotonic() + seconds
    for gw in cluster.gateways():
        while (seen := cluster.readyz(gw.name)[1].get("shard_map")) != version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{gw.name} still routes by shard map {seen}, not {version}")
            time.sleep(0.05)


def _write_map(cluster: Cluster, roles: Sequence[str], shard_map: str) -> None:
    """The cluster's databases and `shard_map` into the shard files of `roles`, and into
    the environment of the `agora shards` commands (fence, prune) run from now on."""
    for role in roles:
        cluster.write_shard_file(role, cluster.dsns(), shard_map)
    cluster.settings_env["AGORA_SHARD_DSNS"] = ",".join(cluster.dsns())
    cluster.settings_env["AGORA_SHARD_MAP"] = shard_map


def _write_and_wait_workers(cluster: Cluster, shard_map: str) -> None:
    """The workers' shard file written, then until each worker logs that it took it."""
    workers = _live(cluster, "worker")
    marker = f"shard map changed: version {_version(cluster, shard_map)} ".encode()
    offsets = [p.log.stat().st_size for p in workers]
    _write_map(cluster, ("worker",), shard_map)
    for proc, offset in zip(workers, offsets, strict=True):
        _wait_log(proc, proc.log, offset, marker, 30)


def _drop_copy(dsn0: str, dsn2: str) -> None:
    """Once nothing writes the range to database 0 (the fence): the copy caught up and the
    subscription dropped."""
    wait_caught_up(dsn0, dsn2, 60)
    sql(dsn2, "DROP SUBSCRIPTION agora_move")
    sql(dsn0, "DROP PUBLICATION agora_move")


def _new_map(cluster: Cluster, dsn0: str, dsn2: str) -> None:
    """The copy frozen and dropped, the new map in the environment of every process
    started from now on."""
    _drop_copy(dsn0, dsn2)
    cluster.settings_env["AGORA_SHARD_DSNS"] = ",".join(cluster.dsns())
    cluster.settings_env["AGORA_SHARD_MAP"] = NEW_MAP


def _live(cluster: Cluster, prefix: str) -> list[Process]:
    return [p for p in cluster.procs if p.alive() and p.host.name.startswith(prefix)]


def _start_worker(cluster: Cluster, proc: Process) -> None:
    cluster.start_worker(proc.host.name, proc.name.rsplit("-", 1)[1])


def _switch_serial(cluster: Cluster, dsn0: str, dsn2: str, steps: dict[str, float]) -> None:
    """The first version: every step after the other."""
    workers, gateways = _live(cluster, "worker"), _live(cluster, "gw")
    t = time.monotonic()
    for proc in workers:
        cluster.stop(proc)
    steps["  workers stopped"] = time.monotonic() - t
    t = time.monotonic()
    _new_map(cluster, dsn0, dsn2)
    steps["  caught up, subscription dropped"] = time.monotonic() - t
    t = time.monotonic()
    for gw in gateways:
        cluster.stop(gw)  # drains: its clients move to the other gateway with `since`
        cluster.start_gateway(gw.host.name)
    steps[f"  {len(gateways)} gateways rolled (one by one, each drained)"] = time.monotonic() - t
    t = time.monotonic()
    for proc in workers:
        _start_worker(cluster, proc)
    steps["  workers started"] = time.monotonic() - t


def _switch_fast(cluster: Cluster, dsn0: str, dsn2: str, steps: dict[str, float]) -> None:
    """The same switch with every step that can overlap overlapped, and nothing more: no
    process with the new map starts before the copy is frozen and dropped, and no worker
    with the new map starts while a gateway with the old one still serves (it would read
    the moved conversations from the frozen copy on database 0). Gateways are rolled one
    at a time, so clients always have one to move to."""
    workers, gateways = _live(cluster, "worker"), _live(cluster, "gw")
    first, rest = gateways[0], gateways[1:]
    t = time.monotonic()
    # The first gateway drains (with the old map everywhere that is harmless) while the
    # workers stop.
    _parallel([partial(cluster.stop, first), *(partial(cluster.stop, p) for p in workers)])
    steps["  workers stopped, first gateway drained"] = time.monotonic() - t
    t = time.monotonic()
    _new_map(cluster, dsn0, dsn2)
    steps["  caught up, subscription dropped"] = time.monotonic() - t
    t = time.monotonic()
    cluster.start_gateway(first.host.name)
    for gw in rest[:-1]:
        cluster.stop(gw)
        cluster.start_gateway(gw.host.name)
    if rest:
        cluster.stop(rest[-1])  # the last old-map process: its clients move to new ones
    steps[f"  {len(gateways)} gateways rolled (one by one, each drained)"] = time.monotonic() - t
    t = time.monotonic()
    last = [partial(cluster.start_gateway, rest[-1].host.name)] if rest else []
    _parallel([*last, *(partial(_start_worker, cluster, p) for p in workers)])
    steps["  workers (and the last gateway) started"] = time.monotonic() - t


def _switch_live(cluster: Cluster, dsn0: str, dsn2: str, steps: dict[str, float]) -> None:
    """Without a restart: the gateways' file first and every gateway seen on the new map
    (a worker on it stores the moved conversations on pg3, which a gateway still on the old
    map would read from pg1's frozen copy), then the workers' file. Behind the fence the
    workers hold the moving range's records and retry them; other shards flow on."""
    t = time.monotonic()
    _drop_copy(dsn0, dsn2)
    steps["  caught up, subscription dropped"] = time.monotonic() - t
    t = time.monotonic()
    _write_map(cluster, ("gateway",), NEW_MAP)
    _wait_gateways(cluster, _version(cluster, NEW_MAP), 30)
    n = len(cluster.gateways())
    steps[f"  gateways' file written, all {n} /readyz on the new map"] = time.monotonic() - t
    t = time.monotonic()
    _write_and_wait_workers(cluster, NEW_MAP)
    steps["  workers' file written, each logged the new map"] = time.monotonic() - t


SWITCHES = {"live": _switch_live, "fast": _switch_fast, "serial": _switch_serial}


def _agora(cluster: Cluster, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=cluster.agora_env(),
        check=True,
        capture_output=True,
        timeout=120,
    )


def move(cluster: Cluster, marks: dict[str, float], switch: str) -> dict[str, float]:
    """The procedure; returns how long each step took (and puts the wall-clock start and
    end of the switch in `marks`). `switch`: a key of SWITCHES."""
    from devstack import services
    from storage.migrate import migrate_all

    live = switch == "live"
    steps: dict[str, float] = {}
    t = time.monotonic()
    dsn0 = cluster.dsns()[0]
    cluster.settings_env["AGORA_SHARD_MAP"] = OLD_MAP  # 1. pin (the same ranges: no restart)
    cluster.add_host("pg3")  # 2. the new host and its database
    cluster.init_postgres("pg3")
    dsn2 = f"postgresql://postgres@{cluster.ip('pg3')}:{PG_PORT}/agora_shard2"
    asyncio.run(services.ensure_databases((dsn2,)))
    asyncio.run(migrate_all((dsn2,)))
    if live:  # appended to every process's databases while they run (the map unchanged)
        _write_map(cluster, ("gateway",), OLD_MAP)
        _wait_gateways(cluster, _version(cluster, OLD_MAP), 30)
        _write_and_wait_workers(cluster, OLD_MAP)
    steps["add host + migrate" + (", its database in the shard files" if live else "")] = (
        time.monotonic() - t
    )
    t = time.monotonic()
    sql(dsn0, f"CREATE PUBLICATION agora_move FOR TABLE {TABLES}")  # 3. copy
    source = f"host={cluster.ip('pg1')} port={PG_PORT} user=postgres dbname=agora_shard0"
    sql(dsn2, f"CREATE SUBSCRIPTION agora_move CONNECTION '{source}' PUBLICATION agora_move")
    wait_caught_up(dsn0, dsn2, 120)  # with writes going on: equal at some instant
    steps["copy (initial sync)"] = time.monotonic() - t
    t = time.monotonic()
    marks["switch_start"] = time.time()
    # 4. The fence first: nothing an old-map process writes to 0-1023 may land on pg1's copy.
    _agora(cluster, "shards", "fence", "--physical", "0", "--range", "0-1023")
    SWITCHES[switch](cluster, dsn0, dsn2, steps)
    marks["workers_switched"] = time.time()
    _agora(cluster, "shards", "unfence", "--physical", "0")
    marks["switch_end"] = time.time()
    what = "the moving range's deliveries held" if live else "no deliveries"
    steps[f"switch in all, fence to unfence ({what})"] = time.monotonic() - t
    t = time.monotonic()
    for physical in (0, 2):  # 5. prune
        _agora(cluster, "shards", "prune", "--physical", str(physical), "--apply")
    steps["prune 0 and 2"] = time.monotonic() - t
    return steps


def check_moved(cluster: Cluster, result: dict[str, Any]) -> dict[str, int]:
    shard_map = ShardMap.parse(NEW_MAP, 4096, 3)
    out = dict.fromkeys(("acked", "moved_convs", "lost", "delivered_twice", "stored_wrong"), 0)
    stored: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for db, dsn in enumerate(cluster.dsns()):
        for r in sql(dsn, "SELECT conv_id, cid, id FROM messages"):
            stored.setdefault((r["conv_id"], r["cid"]), []).append((db, r["id"]))
    for c in result["convs"]:
        want_db = shard_map.physical(shard_of_id(c["conv"]))
        out["moved_convs"] += want_db == 2
        acked_ids = {a["id"] for a in c["acked"].values()}
        out["acked"] += len(acked_ids)
        for got in c["received"].values():
            out["lost"] += len(acked_ids - {int(i) for i in got})
            out["delivered_twice"] += sum(1 for t in got.values() if len(t) > 1)
        for cid, a in c["acked"].items():
            if stored.get((c["conv"], cid)) != [(want_db, a["id"])]:
                out["stored_wrong"] += 1
    return out


GROUPS = {  # the load's conversations by logical shard: moved, staying on pg1, on pg2
    "moved": range(0, 1024),
    "pg1_staying": range(1024, 2048),
    "pg2": range(2048, 4096),
}


def _group(result: dict[str, Any], shards: range) -> dict[str, Any]:
    """The load's result with only the conversations whose logical shard is in `shards`."""
    return {**result, "convs": [c for c in result["convs"] if shard_of_id(c["conv"]) in shards]}


def longest_gap(result: dict[str, Any], after: float) -> tuple[float, float]:
    """The longest time after `after` any receiver went without a message, and when
    (wall clock) that gap began."""
    worst, at = 0.0, after
    for c in result["convs"]:
        receiver = c["members"][1]
        times = sorted(t for ts in c["received"][receiver].values() for t in ts if t >= after)
        for a, b in itertools.pairwise(times):
            if b - a > worst:
                worst, at = b - a, a
    return worst, at


MODES = {
    "live": "without a restart (each role's shard file rewritten, processes re-read it)",
    "fast": "with restarts, steps overlapped where safe",
    "serial": "with restarts, step after step",
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.clusterreshard", description=__doc__)
    p.add_argument(
        "--switch",
        choices=tuple(MODES),
        default="live",
        help="live: shard files re-read by running processes (default); fast: restarts, "
        "steps overlapped where that is safe; serial: restarts, one after another",
    )
    p.add_argument("--restart", action="store_true", help="the same as --switch fast")
    p.add_argument(
        "--drain-window-ms",
        type=int,
        default=2000,
        help="AGORA_DRAIN_WINDOW_MS of the gateways (a restart switch drains each within it)",
    )
    args = p.parse_args()
    switch = "fast" if args.restart else args.switch
    live = switch == "live"
    env = {"AGORA_DRAIN_WINDOW_MS": str(args.drain_window_ms)}
    layout = Layout(
        gateways=2, workers=1, prefix="agcm", subnet="10.77.4", env=env, shard_files=live
    )
    marks: dict[str, float] = {}
    with Cluster(layout) as cluster:
        traffic = start_traffic(cluster, "move", per_db=6, interval_ms=100)
        time.sleep(3)
        steps = move(cluster, marks, switch)
        time.sleep(3)
        result = stop_traffic(cluster, traffic)
        counts = check_moved(cluster, result)
        crashes = cluster.crashed()
    ok = not (counts["lost"] or counts["delivered_twice"] or counts["stored_wrong"] or crashes)
    gap = delivery_gap_s(result, traffic.started)
    gaps = {name: longest_gap(_group(result, r), traffic.started) for name, r in GROUPS.items()}
    # When the moving range's deliveries resumed: after the workers took the new map (live)
    # or started with it (restarts).
    resumed = first_delivery_after(_group(result, GROUPS["moved"]), marks["workers_switched"])
    run = {
        "switch": switch,
        "drain_window_ms": args.drain_window_ms,
        "steps_s": {k: round(v, 1) for k, v in steps.items()},
        "longest_delivery_gap_s": round(gap, 2),
        # per group: the gap, and when it began relative to the fence going up
        "longest_gap_by_group_s": {
            name: [round(g, 2), round(at - marks["switch_start"], 2)]
            for name, (g, at) in gaps.items()
        },
        "switch_s": round(marks["switch_end"] - marks["switch_start"], 2),
        "first_moved_delivery_after_workers_switched_s": round(resumed, 2),
        **counts,
        "crashes": crashes,
    }
    print(orjson.dumps(run).decode())
    m, cond = machine(), conditions()
    if live:
        how = (
            "Sends are acked throughout and no process restarts: behind the fence the workers "
            "hold the moving range's records (each logical shard under its own backoff) and "
            "retry them; pg1's other conversations and pg2's deliver throughout."
        )
        resumed_after = "the last worker logged the new map"
    else:
        how = (
            "Sends are acked throughout (one gateway is always up); deliveries wait in Kafka "
            "while the workers are stopped."
        )
        resumed_after = "the last worker logged its start (its consumer joining the group)"
    block = "\n".join(
        [
            "### Moving logical shards to a new PostgreSQL host (`python -m bench.clusterreshard`"
            + ("" if live else f", switch with restarts: {switch}")
            + ")",
            "",
            machine_line(m, cond),
            "",
            f"`{' '.join(['python -m bench.clusterreshard', *sys.argv[1:]])}`: logical shards "
            f"0-1023 moved from pg1 to a new host pg3 under traffic (2 gateway hosts, 1 worker "
            f"host, switch {MODES[switch]}"
            + ("" if live else f", gateways' drain window {args.drain_window_ms} ms")
            + ", the range fenced on pg1 for the switch: `agora shards fence`); "
            f"{counts['moved_convs']} of the load's {len(result['convs'])} conversations "
            f"moved. {how} Longest time any receiver went without a message: **{gap:.1f} s** "
            f"(by conversation: moved {gaps['moved'][0]:.1f} s, staying on pg1 "
            f"{gaps['pg1_staying'][0]:.1f} s, on pg2 {gaps['pg2'][0]:.1f} s); "
            f"the moved conversations' first delivery came {resumed:.1f} s after "
            f"{resumed_after}. Verdict: {'ok' if ok else 'FAIL'}. Link delay: none (this "
            "kernel has no sch_netem).",
            "",
            md_table(
                [f"step (switch: {switch})", "seconds"],
                [[k.replace("  ", "- "), v] for k, v in run["steps_s"].items()],
            ),
            "",
            md_table(
                ["acked", "lost", "delivered twice", "stored wrong (not once, on the new map)"],
                [[counts[k] for k in ("acked", "lost", "delivered_twice", "stored_wrong")]],
            ),
        ]
    )
    write_results(
        "clusterreshard" if live else "clusterreshard-restart",
        {"command": " ".join(sys.argv), "machine": m, "conditions": cond, "run": run},
        block,
    )


def first_delivery_after(result: dict[str, Any], when: float) -> float:
    """Seconds from `when` to the first message any receiver got after it."""
    times = [
        t
        for c in result["convs"]
        for got in c["received"].values()
        for ts in got.values()
        for t in ts
        if t >= when
    ]
    return min(times) - when if times else float("nan")


if __name__ == "__main__":
    main()
