"""Feeds under concurrency: GET /v1/feeds/{trending|new|top} from cache and on a cold rebuild.

Seeds P posts (over a few communities) and V votes, then per feed kind:
- cached: `--concurrency` keep-alive connections in a closed loop for `--duration` s:
  requests/s, p50/p95/p99;
- cold: `--cold-rounds` times, the feed's ready marker is deleted (what a Redis flush or an
  expiry does) and one request rebuilds it from the shards: its latency; then once, the
  marker is deleted under `--concurrency` simultaneous requests (a thundering herd).

    .venv/bin/python -m bench.feeds --posts 2000 --votes 4000 --concurrency 32 --duration 10

The gateway runs on the first core, the load generator on the last. Skips (and says so)
when the gateway has no feeds API.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import math
import random
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
    write_results,
)
from bench.httpload import closed_loop, get_request
from bench.loadgen import WorkerPool
from bench.profile import Profiler
from bench.profile import render as render_profile
from bench.stack import BenchProc, BenchStack, bench_stack, http_json, unique_tag

NAME = "feeds"
KINDS = ("trending", "new", "top")


class FeedsWorker:
    async def load(
        self,
        host: str,
        port: int,
        requests: list[bytes],
        concurrency: int,
        duration: float,
        ips: list[str],
        start_at: float,
        max_per_conn: int = 0,
    ) -> dict[str, Any]:
        delay = start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return await closed_loop(host, port, requests, concurrency, duration, ips, max_per_conn)


def _seed(stack: BenchStack, gw: BenchProc, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Posts by a few authors over a few communities, then votes; returns counts."""
    authors = [f"a{tag}-{i}" for i in range(max(1, args.posts // 20))]
    communities = [f"bench{i % args.communities}" for i in range(5)]
    rng = random.Random(7)

    def post(i: int) -> str | None:
        body = {"title": f"post {i}", "body": "x" * 200, "community": communities[i % 5]}
        token = stack.token(authors[i % len(authors)])
        status, data = http_json("POST", f"{gw.http_url}/v1/posts", token, body)
        return str(data["id"]) if status == 201 and isinstance(data, dict) else None

    def vote(i: int) -> int:
        pid = post_ids[rng.randrange(len(post_ids))]
        voter = f"v{tag}-{i % max(1, args.votes // 4)}"
        status, _ = http_json(
            "PUT", f"{gw.http_url}/v1/posts/{pid}/vote", stack.token(voter), {"value": 1}
        )
        return status

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        post_ids = [p for p in pool.map(post, range(args.posts)) if p]
        if not post_ids:
            return {"posts": 0, "votes": 0, "seed_s": 0.0}
        statuses = Counter(pool.map(vote, range(args.votes)))
    return {
        "posts": len(post_ids),
        "votes_ok": statuses.get(200, 0),
        "vote_statuses": {str(k): v for k, v in statuses.items()},
        "seed_s": round(time.monotonic() - t0, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    raise_nofile()
    gw_cpus, lg_cpus = cpu_sets()
    with bench_stack(gw_cpus, experiment=args.experiment) as stack:
        tag = unique_tag()
        gw = stack.gateway(f"feeds-{tag}")
        status, _ = http_json("GET", f"{gw.http_url}/v1/feeds/new", stack.token("probe"))
        if status == 404:
            return {"bench": NAME, "skipped": "the gateway has no GET /v1/feeds/{kind} yet"}
        scores = stack._spawn(f"feeds-scores-{tag}", ["scores"], None, None)
        seeded = _seed(stack, gw, args, tag)
        time.sleep(2.0)  # let the scores worker apply the votes
        pin(lg_cpus)
        pool = WorkerPool("bench.feeds:FeedsWorker", args.procs, lg_cpus)
        try:
            data = uvloop.run(_measure(args, stack, gw, pool, tag))
        finally:
            pool.close()
        data["summary"]["seed"] = seeded
        data["summary"]["scores_worker_alive"] = scores.alive()
        return data


async def _measure(
    args: argparse.Namespace, stack: BenchStack, gw: BenchProc, pool: WorkerPool, tag: str
) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from storage.ranking import DEFAULT_WINDOW
    from storage.redis_keys import RedisKeys

    redis = aioredis.Redis.from_url(stack.settings.redis_url)
    keys = RedisKeys(stack.settings.redis_prefix)
    host, port = "127.0.0.1", gw.port or 0
    ips = list(SOURCE_IPS[: args.source_ips])
    readers = [f"r{tag}-{i}" for i in range(50)]
    per_worker = max(1, math.ceil(args.concurrency / pool.size))
    cond = conditions()
    kinds_out: dict[str, Any] = {}
    profile = None
    try:
        for kind in KINDS:
            path = f"/v1/feeds/{kind}?limit={args.limit}"
            reqs = [get_request(host, port, path, stack.token(u)) for u in readers]
            window = DEFAULT_WINDOW.value if kind == "top" else None
            ready_key = keys.feed_ready(kind, None, window)
            http_json("GET", f"{gw.http_url}{path}", stack.token(readers[0]))  # build it
            # Cached: closed loop.
            cpu0 = gw.cpu_s()
            wait0 = gw.sched_s()[1]
            snap = cpu_snapshot()
            profiler = None
            if args.profile and kind == "trending":
                profiler = Profiler(
                    gw.pid, Path(args.out) / f"{NAME}-trending-profile.txt", native=args.native
                )
                profiler.start()
            start_at = time.monotonic() + 0.3
            parts = await pool.call(
                "load",
                {
                    "host": host,
                    "port": port,
                    "requests": reqs,
                    "concurrency": per_worker,
                    "duration": args.duration,
                    "ips": ips,
                    "start_at": start_at,
                },
            )
            if profiler is not None:
                profile = profiler.stop()
            elapsed = max(p["elapsed_s"] for p in parts)
            machine_cpu = cpu_by_process(
                snap, cpu_snapshot(), elapsed, {gw.pid: "gateway (under test)"}
            )
            gw_cpu = (gw.cpu_s() - cpu0) / elapsed
            starved = (gw.sched_s()[1] - wait0) / elapsed
            lat = [x for p in parts for x in p["latencies_ms"]]
            statuses: Counter[str] = Counter()
            errors: Counter[str] = Counter()
            for p in parts:
                statuses.update({str(k): v for k, v in p["statuses"].items()})
                errors.update(p["errors"])
            cached = {
                "requests": len(lat),
                "rps": round(len(lat) / elapsed, 1),
                "latency_ms": percentiles(lat),
                "statuses": dict(statuses),
                "errors": dict(errors),
                "gateway_cpu": round(gw_cpu, 2),
                # Robust to noisy neighbours: what one request costs the gateway's core.
                "gateway_cpu_ms_per_request": round(1000 * gw_cpu * elapsed / max(1, len(lat)), 3),
                "cpu": machine_cpu,
                "gateway_runqueue_wait": round(starved, 2),
            }
            # Cold: one request after dropping the ready marker, several times.
            cold_lat = []
            t_cold = time.monotonic()
            for _ in range(args.cold_rounds):
                await redis.delete(ready_key)
                t = time.monotonic()
                st, _ = await asyncio.to_thread(
                    http_json, "GET", f"{gw.http_url}{path}", stack.token(readers[1])
                )
                cold_lat.append((time.monotonic() - t) * 1000)
                statuses[f"cold {st}"] += 1
            cold_elapsed = time.monotonic() - t_cold
            # A herd: the marker dropped under concurrent readers.
            await redis.delete(ready_key)
            herd = await pool.call(
                "load",
                {
                    "host": host,
                    "port": port,
                    "requests": reqs,
                    "concurrency": per_worker,
                    "duration": 30.0,
                    "max_per_conn": 1,  # one request per connection, all at once
                    "ips": ips,
                    "start_at": time.monotonic() + 0.3,
                },
            )
            herd_lat = [x for p in herd for x in p["latencies_ms"]]
            kinds_out[kind] = {
                "cached": cached,
                "cold": {
                    "rounds": args.cold_rounds,
                    "latency_ms": percentiles(cold_lat),
                    "rps_sequential": round(len(cold_lat) / max(cold_elapsed, 1e-6), 1),
                },
                "herd": {
                    "requests": len(herd_lat),
                    "latency_ms": percentiles(herd_lat),
                },
            }
            print(
                f"  {kind}: cached {cached['rps']:,.0f} req/s p50 {cached['latency_ms']['p50']}"
                f" p99 {cached['latency_ms']['p99']} ms (gw CPU {cached['gateway_cpu']}); cold "
                f"p50 {kinds_out[kind]['cold']['latency_ms']['p50']} ms; herd p99 "
                f"{kinds_out[kind]['herd']['latency_ms']['p99']} ms; statuses {dict(statuses)}"
            )
    finally:
        await redis.aclose()
    trending = kinds_out["trending"]["cached"]
    return {
        "bench": NAME,
        "command": command_line(),
        "machine": machine(),
        "conditions": cond,
        "conditions_end": conditions(),
        "params": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "results_md")},
            "gateway_pid": gw.pid,
        },
        "summary": {k: v["cached"]["rps"] for k, v in kinds_out.items()},
        "kinds": kinds_out,
        "targets": {
            "trending_3k": {
                "target": "trending feed >= 3,000 req/s per process, p99 < 20 ms from cache",
                "rps": trending["rps"],
                "p99_ms": trending["latency_ms"]["p99"],
                "reached": trending["rps"] >= 3000 and trending["latency_ms"]["p99"] < 20,
            }
        },
        "profile": profile,
    }


HEADERS = ["feed", "cached req/s", "p50 ms", "p95 ms", "p99 ms", "gw CPU", "gw CPU ms/req"]
HEADERS += ["non-200"]
HEADERS += ["cold p50 ms", "cold p99 ms", "herd p50 ms", "herd p99 ms"]


def render(data: dict[str, Any]) -> str:
    if data.get("skipped"):
        return f"### Feeds (`bench.feeds`)\n\nskipped: {data['skipped']}"
    rows = []
    for kind, k in data["kinds"].items():
        c = k["cached"]
        non200 = sum(v for s, v in c["statuses"].items() if s != "200") + sum(c["errors"].values())
        rows.append(
            [
                kind,
                c["rps"],
                c["latency_ms"]["p50"],
                c["latency_ms"]["p95"],
                c["latency_ms"]["p99"],
                c["gateway_cpu"],
                c["gateway_cpu_ms_per_request"],
                non200,
                k["cold"]["latency_ms"]["p50"],
                k["cold"]["latency_ms"]["p99"],
                k["herd"]["latency_ms"]["p50"],
                k["herd"]["latency_ms"]["p99"],
            ]
        )
    t = data["targets"]["trending_3k"]
    seed = data["summary"].get("seed", {})
    lines = [
        "### Feeds (`bench.feeds`)" + experiment_note(data),
        "",
        f"`{data['command']}`",
        "",
        machine_line(data["machine"], data["conditions"]),
        "",
        f"seeded {seed.get('posts', 0):,} posts and {seed.get('votes_ok', 0):,} votes; "
        f"{data['params']['concurrency']} keep-alive connections in a closed loop, "
        f"limit={data['params']['limit']}; cold = one request after the ready marker was "
        "deleted (a rebuild from the shards); herd = the marker deleted under all connections.",
        "",
        md_table(HEADERS, rows),
        "",
        "CPU by process, trending cached (cores): "
        + str(data["kinds"]["trending"]["cached"]["cpu"]),
        "",
        f"- {t['target']}: {verdict(t['reached'])} ({t['rps']:,.0f} req/s, p99 {t['p99_ms']} ms)",
    ]
    if data.get("profile"):
        lines += ["", "Gateway profile, trending from cache:", "", render_profile(data["profile"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posts", type=int, default=2000)
    p.add_argument("--votes", type=int, default=4000)
    p.add_argument("--communities", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--limit", type=int, default=25)
    p.add_argument("--cold-rounds", type=int, default=20)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--source-ips", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="py-spy the gateway (trending cached)")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--experiment", default="", help="bench.experiment patches, e.g. timing")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--results-md", default=str(RESULTS_MD))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data = run(args)
    md = Path(args.results_md) if args.results_md else None
    if data.get("skipped"):
        print(f"feeds: skipped: {data['skipped']}")
        return data
    path = write_results(result_name(NAME, args.experiment), data, render(data), Path(args.out), md)
    t = data["targets"]["trending_3k"]
    print(f"feeds: trending {t['rps']} req/s p99 {t['p99_ms']} ms; {data['summary']} -> {path}")
    return data


if __name__ == "__main__":
    main()
