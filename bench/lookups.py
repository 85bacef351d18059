"""The send path's shard read alone: `StoredLookups.ask` paced at a fixed rate, lone reads
of cids not stored (a new send's usual case), on the lookups' held connection or, for
comparison, on a connection acquired from the pool per read (the code before
`ShardPools.on_held`). Prints the client's CPU per read (os.times) and PostgreSQL's (its
processes' utime+stime from /proc), as one JSON line.

    taskset -c 1 .venv/bin/python -m bench.lookups --pg postgresql://postgres@127.0.0.1:55405 \\
        --via held --reads 2000 --rate 250

`--via none` runs the pacing loop alone (its own CPU, to take off the others).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from core.settings import Settings
from devstack.services import ensure_databases
from gateway.coalesce import Coalescer
from gateway.lookups import Found, Key, StoredLookups
from storage import messages
from storage.ids import IdGenerator
from storage.migrate import migrate_all
from storage.pools import ShardPools

_TICK = os.sysconf("SC_CLK_TCK")


def _pg_cpu_s(postmaster: int) -> float:
    """CPU seconds of the postmaster and its children (the backends, the writers)."""
    pids = [postmaster]
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def _client_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def run(pg: str, via: str, reads: int, rate: float, postmaster: int) -> dict[str, object]:
    dsns = (f"{pg}/agora_bench_lookups_0", f"{pg}/agora_bench_lookups_1")
    await ensure_databases(dsns)
    await migrate_all(dsns)
    settings = Settings.from_env({"AGORA_SHARD_DSNS": ",".join(dsns), "AGORA_PG_POOL_MAX": "4"})
    pools = ShardPools(settings)
    conv = IdGenerator().next_id(0)  # logical shard 0: physical 0
    lookups = StoredLookups(pools)
    pooled: Coalescer[Key, Found] = Coalescer(lambda p, keys: messages.stored_ids(pools, p, keys))

    async def one(i: int) -> None:
        if via == "held":
            await lookups.ask(conv, "bench", f"c{i}")
        elif via == "pool":
            await pooled.ask(0, (conv, "bench", f"c{i}"))

    try:
        for i in range(200):  # connections made, statements prepared, plans settled
            await one(-i - 1)
        loop = asyncio.get_running_loop()
        cpu0, pg0, wall0 = _client_cpu_s(), _pg_cpu_s(postmaster), time.monotonic()
        start = loop.time()
        for i in range(reads):
            wait = start + i / rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await one(i)
        cpu, pg_cpu, wall = (
            _client_cpu_s() - cpu0,
            _pg_cpu_s(postmaster) - pg0,
            time.monotonic() - wall0,
        )
    finally:
        await pools.close()
    return {
        "via": via,
        "reads": reads,
        "rate": rate,
        "wall_s": round(wall, 2),
        "client_us_per_read": round(cpu / reads * 1e6, 1),
        "pg_us_per_read": round(pg_cpu / reads * 1e6, 1),
        "held_connects": pools.held_connects,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", required=True, help="postgresql://user@host:port (no database)")
    parser.add_argument("--postmaster", type=int, required=True, help="the PostgreSQL's pid")
    parser.add_argument("--via", choices=("held", "pool", "none"), default="held")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=250.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.pg, args.via, args.reads, args.rate, args.postmaster))))


if __name__ == "__main__":
    main()
