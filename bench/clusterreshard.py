"""Moving logical shards to a new PostgreSQL host on the namespace cluster, under traffic.

    python -m bench.clusterreshard

docs/operations.md's procedure, step by step, while the load generator sends: pin the map
(`0-2047=0,2048-4095=1`, what the equal ranges are), add a host pg3 with a new database
(migrated), copy database 0 into it with PostgreSQL logical replication, stop the workers
(sends go on: they wait in Kafka), wait until the copy has caught up, drop the
subscription, roll every gateway (SIGTERM: its clients move with `since`) and start the
workers with `0-1023=2,1024-2047=0,2048-4095=1`, then `agora shards prune --apply` on
databases 0 and 2. Checked at the end: every acked message stored exactly once across the
three databases, on the one the new map names, under its acked id; every member got every
acked message exactly once.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import asyncpg
import orjson

from bench.cluster import PG_PORT, Cluster, Layout
from bench.clusterfaults import start_traffic, stop_traffic
from bench.common import conditions, machine, machine_line, md_table, write_results
from storage.ids import shard_of_id
from storage.shards import ShardMap

OLD_MAP = "0-2047=0,2048-4095=1"
NEW_MAP = "0-1023=2,1024-2047=0,2048-4095=1"
TABLES = "users, conversations, members, user_conversations, messages, posts, votes"


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


def move(cluster: Cluster) -> dict[str, float]:
    """The procedure; returns how long each step took."""
    from devstack import services
    from storage.migrate import migrate_all

    steps: dict[str, float] = {}
    t = time.monotonic()
    dsn0 = cluster.dsns()[0]
    cluster.settings_env["AGORA_SHARD_MAP"] = OLD_MAP  # 1. pin (the same ranges: no restart)
    cluster.add_host("pg3")  # 2. the new host and its database
    cluster.init_postgres("pg3")
    dsn2 = f"postgresql://postgres@{cluster.ip('pg3')}:{PG_PORT}/agora_shard2"
    asyncio.run(services.ensure_databases((dsn2,)))
    asyncio.run(migrate_all((dsn2,)))
    steps["add host + migrate"] = time.monotonic() - t
    t = time.monotonic()
    sql(dsn0, f"CREATE PUBLICATION agora_move FOR TABLE {TABLES}")  # 3. copy
    source = f"host={cluster.ip('pg1')} port={PG_PORT} user=postgres dbname=agora_shard0"
    sql(dsn2, f"CREATE SUBSCRIPTION agora_move CONNECTION '{source}' PUBLICATION agora_move")
    wait_caught_up(dsn0, dsn2, 120)  # with writes going on: equal at some instant
    steps["copy (initial sync)"] = time.monotonic() - t
    t = time.monotonic()
    workers = [p for p in cluster.procs if p.alive() and p.host.name.startswith("worker")]
    for proc in workers:  # 4. switch: no writes to the shards while the map changes
        cluster.stop(proc)
    wait_caught_up(dsn0, dsn2, 60)
    sql(dsn2, "DROP SUBSCRIPTION agora_move")
    sql(dsn0, "DROP PUBLICATION agora_move")
    cluster.settings_env["AGORA_SHARD_DSNS"] = ",".join(cluster.dsns())
    cluster.settings_env["AGORA_SHARD_MAP"] = NEW_MAP
    for gw in [p for p in cluster.procs if p.alive() and p.host.name.startswith("gw")]:
        cluster.stop(gw)  # drains: its clients move to the other gateway with `since`
        cluster.start_gateway(gw.host.name)
    for proc in workers:
        cluster.start_worker(proc.host.name, proc.name.rsplit("-", 1)[1])
    steps["switch (workers stopped)"] = time.monotonic() - t
    t = time.monotonic()
    for physical in (0, 2):  # 5. prune
        prune = [sys.executable, "-m", "gateway.cli", "shards", "prune"]
        subprocess.run(
            [*prune, "--physical", str(physical), "--apply"],
            env=cluster.agora_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
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


def main() -> None:
    layout = Layout(gateways=2, workers=1, prefix="agcm", subnet="10.77.4")
    with Cluster(layout) as cluster:
        traffic = start_traffic(cluster, "move", per_db=6, interval_ms=100)
        time.sleep(3)
        steps = move(cluster)
        time.sleep(3)
        result = stop_traffic(cluster, traffic)
        counts = check_moved(cluster, result)
        crashes = cluster.crashed()
    ok = not (counts["lost"] or counts["delivered_twice"] or counts["stored_wrong"] or crashes)
    run = {"steps_s": {k: round(v, 1) for k, v in steps.items()}, **counts, "crashes": crashes}
    print(orjson.dumps(run).decode())
    m, cond = machine(), conditions()
    block = "\n".join(
        [
            "### Moving logical shards to a new PostgreSQL host (`python -m bench.clusterreshard`)",
            "",
            machine_line(m, cond),
            "",
            f"Logical shards 0-1023 moved from pg1 to a new host pg3 under traffic; "
            f"{counts['moved_convs']} of the load's conversations moved. "
            f"Verdict: {'ok' if ok else 'FAIL'}.",
            "",
            md_table(["step", "seconds"], list(run["steps_s"].items())),
            "",
            md_table(
                ["acked", "lost", "delivered twice", "stored wrong (not once, on the new map)"],
                [[counts[k] for k in ("acked", "lost", "delivered_twice", "stored_wrong")]],
            ),
        ]
    )
    write_results(
        "clusterreshard",
        {"command": " ".join(sys.argv), "machine": m, "conditions": cond, "run": run},
        block,
    )


if __name__ == "__main__":
    main()
