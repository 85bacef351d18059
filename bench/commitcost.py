"""What one durable commit costs on this machine, with nothing of Agora's in it (issue 14's
floors): a single INSERT statement (its own transaction, so it commits) on one asyncpg
connection, paced at --rates commits/s (0: back to back), --rows rows per statement.

Per variant: the commit's wall time (p50/p99, synchronous_commit as the server has it),
the backend's on-CPU time per commit (`/proc/<pg_backend_pid()>/schedstat`, ns) and the
whole cluster's (the postmaster and every process under it: WAL writer, checkpointer...),
and this client's CPU. PostgreSQL must be local (the /proc reads) and is left where the
scheduler puts it, as in the pinned scenario. A scratch database, dropped at the end.

    .venv/bin/python -m bench.commitcost --dsn postgresql://postgres@127.0.0.1:55402
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def on_cpu_ns(pid: int) -> int:
    """Nanoseconds the process has run (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except OSError:
        return 0


def tree_ns(root: int) -> int:
    """On-CPU ns of `root` and its children (a postmaster's processes are its children)."""
    total = on_cpu_ns(root)
    try:
        children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(on_cpu_ns(int(c)) for c in children)


async def variant(
    conn: asyncpg.Connection, backend: int, postmaster: int, rate: float, rows: int, n: int
) -> dict[str, float]:
    body = "x" * 64
    if rows == 1:
        sql = "INSERT INTO floor_commit VALUES ($1, $2, $3, $4)"
    else:
        sql = (
            "INSERT INTO floor_commit SELECT * FROM "
            "unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[])"
        )
    conv = secrets.randbits(40)
    walls: list[float] = []
    b0, t0, c0 = on_cpu_ns(backend), tree_ns(postmaster), time.process_time()
    due = time.monotonic()
    for i in range(n):
        ts = time.time_ns()
        if rows == 1:
            args: tuple[object, ...] = (conv, i, body, ts)
        else:
            args = (
                [conv] * rows,
                list(range(i * rows, (i + 1) * rows)),
                [body] * rows,
                [ts] * rows,
            )
        start = time.perf_counter()
        await conn.execute(sql, *args)
        walls.append((time.perf_counter() - start) * 1e3)
        if rate > 0:
            due += 1 / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
    backend_ns, cluster_ns = on_cpu_ns(backend) - b0, tree_ns(postmaster) - t0
    walls.sort()
    return {
        "rate": rate,
        "rows": rows,
        "commits": n,
        "wall_p50_ms": round(statistics.median(walls), 3),
        "wall_p99_ms": round(walls[int(0.99 * (n - 1))], 3),
        "backend_us_per_commit": round(backend_ns / n / 1e3, 1),
        "cluster_us_per_commit": round(cluster_ns / n / 1e3, 1),
        "client_us_per_commit": round((time.process_time() - c0) / n * 1e6, 1),
    }


async def run(args: argparse.Namespace) -> None:
    admin = await asyncpg.connect(args.dsn + "/postgres")
    db = f"floors_{secrets.token_hex(3)}"
    await admin.execute(f"CREATE DATABASE {db}")
    try:
        conn = await asyncpg.connect(args.dsn + f"/{db}")
        await conn.execute(
            "CREATE TABLE floor_commit (conv_id bigint, seq bigint, body text, ts bigint, "
            "PRIMARY KEY (conv_id, seq))"
        )
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        datadir = await conn.fetchval("SHOW data_directory")
        pidfile = await asyncio.to_thread(Path(datadir, "postmaster.pid").read_text)
        postmaster = int(pidfile.split()[0])
        print(
            {
                k: await conn.fetchval(f"SHOW {k}")
                for k in ("synchronous_commit", "wal_sync_method", "fsync", "commit_delay")
            },
            flush=True,
        )
        await variant(conn, backend, postmaster, 0, 1, 200)  # warm-up
        for rnd in range(args.rounds):
            for rate in (float(r) for r in args.rates.split(",")):
                for rows in (int(r) for r in args.rows.split(",")):
                    row = await variant(conn, backend, postmaster, rate, rows, args.commits)
                    print({"round": rnd + 1, **row, "load": os.getloadavg()[0]}, flush=True)
        await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE {db} WITH (FORCE)")
        await admin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    dsn = os.environ.get("AGORA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--dsn", default=dsn, help="server URL without a database")
    p.add_argument("--rates", default="100,500,0", help="commits/s per variant (0: back to back)")
    p.add_argument("--rows", default="1,10", help="rows per statement")
    p.add_argument("--commits", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    parts = urlsplit(args.dsn)
    args.dsn = urlunsplit(parts._replace(path="")).rstrip("/")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
