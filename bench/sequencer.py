"""One shard batch, sequenced both ways: the explicit transaction (`storage.messages.
append_batch`: BEGIN, dedup SELECT, UPDATE, COPY, COMMIT) against the one statement
(`storage.onetrip.append`), on one PostgreSQL connection, batch after batch (issue 14).

A scratch database on the local PostgreSQL (AGORA_TEST_PG, or --dsn) gets the migrations
and --convs group conversations of 20 members; each batch holds --sizes plain texts
(64-byte bodies) of conversations picked at random, all fresh. The two paths alternate
in --rounds rounds of --batches batches each (after a warm-up), so drift on a shared
machine hits both. Per batch: this client's CPU (`time.process_time`, the whole process),
the backend's CPU (`/proc/<pg_backend_pid()>/task/*/schedstat`: on-CPU ns, its commit's
WAL flush included) and the wall time (synchronous_commit as configured: on by default).
The scratch database is dropped at the end.

    .venv/bin/python -m bench.sequencer                      # 1 and 10 messages a batch
    .venv/bin/python -m bench.sequencer --batches 300 --rounds 4 --sizes 1,2,10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.common import (
    RESULTS_DIR,
    RESULTS_MD,
    command_line,
    conditions,
    machine,
    machine_line,
    md_table,
    proc_sched_s,
    write_results,
)
from storage import messages, onetrip
from storage.migrate import migrate_database
from storage.models import NewMessage

NAME = "sequencer"
PATHS = ("transaction", "one statement")
MEMBERS = 20


def _with_db(dsn: str, name: str) -> str:
    p = urlsplit(dsn)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


class _Batches:
    """Fresh plain-text batches over `convs` group conversations (never a repeat)."""

    def __init__(self, convs: list[int], rng: random.Random) -> None:
        self.convs = convs
        self.rng = rng
        self.next_id = 1

    def make(self, size: int) -> list[NewMessage]:
        out = []
        for _ in range(size):
            conv = self.rng.choice(self.convs)
            i, self.next_id = self.next_id, self.next_id + 1
            sender = f"u{conv}-{self.rng.randrange(MEMBERS)}"
            body = f"{i:016d}" + "x" * 48
            out.append(NewMessage(conv, i, sender, f"c{i}", body, int(time.time() * 1000), "text"))
        return out


async def _run(conn: Any, path: str, batches: list[list[NewMessage]]) -> dict[str, float]:
    """Sequence `batches` one after another by `path`; totals of client CPU, backend CPU
    and wall seconds."""
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    cpu0, pg0, wall0 = time.process_time(), proc_sched_s(backend)[0], time.perf_counter()
    for batch in batches:
        if path == "transaction":
            async with conn.transaction():
                stored, _, _ = await messages.append_batch(conn, batch)
        else:
            stored, _, _ = await onetrip.append(conn, batch)
        assert len(stored) == len(batch)
    wall = time.perf_counter() - wall0
    return {
        "client_cpu_s": time.process_time() - cpu0,
        "pg_cpu_s": proc_sched_s(backend)[0] - pg0,
        "wall_s": wall,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    base = args.dsn or os.environ.get("AGORA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
    name = f"agora_bench_seq_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(_with_db(base, "postgres"))
    await admin.execute(f"CREATE DATABASE {name}")
    dsn = _with_db(base, name)
    rng = random.Random(args.seed)
    try:
        await migrate_database(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            convs = list(range(1, args.convs + 1))
            await conn.execute(
                """INSERT INTO conversations (id, kind, created_by)
                   SELECT g, 'group', 'u' || g || '-0' FROM generate_series(1, $1) g""",
                args.convs,
            )
            await conn.execute(
                """INSERT INTO members (conv_id, user_id)
                   SELECT c, 'u' || c || '-' || m
                   FROM generate_series(1, $1) c, generate_series(0, $2 - 1) m""",
                args.convs,
                MEMBERS,
            )
            # A shard in service: messages already stored, statistics current. On a fresh
            # table the planner guesses its size, and a generic plan made then (after a
            # prepared statement's fifth run, on either path) can keep a seq scan of
            # `messages` per batch until the next ANALYZE.
            await conn.execute(
                """INSERT INTO messages (conv_id, seq, id, sender, cid, body, ts)
                   SELECT (g % $2) + 1, g, -g, 'seed', 'seed' || g, 'old', 0
                   FROM generate_series(1, $1) g""",
                args.existing,
                args.convs,
            )
            await conn.execute("UPDATE conversations SET last_seq = $1", args.existing)
            await conn.execute("ANALYZE")
            if args.plan_cache_mode:
                await conn.execute(f"SET plan_cache_mode = {args.plan_cache_mode}")
            sync = await conn.fetchval("SHOW synchronous_commit")
            source = _Batches(convs, rng)
            totals: dict[tuple[int, str], dict[str, float]] = defaultdict(
                lambda: {"client_cpu_s": 0.0, "pg_cpu_s": 0.0, "wall_s": 0.0, "batches": 0}
            )
            for size in args.sizes:
                for path in PATHS:  # warm-up: prepared statements, type introspection, caches
                    await _run(conn, path, [source.make(size) for _ in range(args.warmup)])
                for r in range(args.rounds):
                    order = PATHS if r % 2 == 0 else PATHS[::-1]
                    for path in order:
                        got = await _run(
                            conn, path, [source.make(size) for _ in range(args.batches)]
                        )
                        t = totals[(size, path)]
                        for k, v in got.items():
                            t[k] += v
                        t["batches"] += args.batches
            # PostgreSQL plans the statement anew per batch (a custom plan, ~0.4 ms of
            # planning for these CTEs) until it finds a generic plan no dearer: said here.
            plans = await conn.fetchrow(
                """SELECT sum(generic_plans) AS generic, sum(custom_plans) AS custom
                   FROM pg_prepared_statements WHERE statement LIKE '%WITH k AS%'"""
            )
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()

    rows = []
    for (size, path), t in totals.items():
        n = t["batches"]
        rows.append(
            {
                "size": size,
                "path": path,
                "batches": int(n),
                "client_cpu_ms": 1000 * t["client_cpu_s"] / n,
                "pg_cpu_ms": 1000 * t["pg_cpu_s"] / n,
                "wall_ms": 1000 * t["wall_s"] / n,
            }
        )
    by = {(r["size"], r["path"]): r for r in rows}
    cheaper = all(
        by[(s, "one statement")]["pg_cpu_ms"] < by[(s, "transaction")]["pg_cpu_ms"]
        and by[(s, "one statement")]["client_cpu_ms"] < by[(s, "transaction")]["client_cpu_ms"]
        for s in args.sizes
    )
    return {
        "bench": NAME,
        "command": command_line(),
        "machine": machine(),
        "conditions": conditions(),
        "params": {
            "sizes": args.sizes,
            "batches": args.batches,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "convs": args.convs,
            "existing": args.existing,
            "synchronous_commit": sync,
            "plan_cache_mode": args.plan_cache_mode or "default",
        },
        "statement_plans": {"generic": int(plans["generic"]), "custom": int(plans["custom"])},
        "rows": rows,
        "summary": {
            f"{s}: {k}": round(
                by[(s, "transaction")][k] / max(by[(s, "one statement")][k], 1e-9), 2
            )
            for s in args.sizes
            for k in ("client_cpu_ms", "pg_cpu_ms", "wall_ms")
        },
        "targets": {
            "cheaper": {
                "target": "the one statement costs less client and PostgreSQL CPU per batch",
                "reached": cheaper,
            }
        },
    }


def markdown(data: dict[str, Any]) -> str:
    p = data["params"]
    table = md_table(
        ["msgs/batch", "path", "batches", "client CPU ms", "PostgreSQL CPU ms", "wall ms"],
        [
            (r["size"], r["path"], r["batches"], r["client_cpu_ms"], r["pg_cpu_ms"], r["wall_ms"])
            for r in data["rows"]
        ],
    )
    return (
        "### One shard batch, sequenced both ways (`bench.sequencer`)\n\n"
        f"{machine_line(data['machine'], data['conditions'])}\n\n"
        f"`{data['command']}`: {p['rounds']} alternating rounds of {p['batches']} batches per"
        f" path and size, {p['convs']} conversations, {p['existing']:,} messages stored before"
        f" (then ANALYZE), synchronous_commit {p['synchronous_commit']}"
        f", plan_cache_mode {p['plan_cache_mode']}; the statement ran"
        f" {data['statement_plans']['generic']:,} times on a generic plan,"
        f" {data['statement_plans']['custom']:,} on a custom one; per batch:\n\n"
        f"{table}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default="", help="PostgreSQL server (default: AGORA_TEST_PG)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10])
    ap.add_argument("--batches", type=int, default=500, help="per round, path and size")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--convs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--existing", type=int, default=100_000, help="messages stored before")
    ap.add_argument("--plan-cache-mode", default="", help="an experiment: SET plan_cache_mode")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--results-md", default=str(RESULTS_MD))
    args = ap.parse_args()
    data = asyncio.run(bench(args))
    md = markdown(data)
    write_results(NAME, data, md, args.out, Path(args.results_md) if args.results_md else None)
    print(md)


if __name__ == "__main__":
    main()
