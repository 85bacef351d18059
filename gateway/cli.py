"""`agora`: one command line for every process and chore.

agora services up|down|status   local PostgreSQL, Redis and Kafka (Tansu) for dev/tests
agora migrate                   apply schema migrations to every physical shard
agora gateway --port P --workers N
agora fanout [--workers N]      the messages fan-out workers (supervised: restarted on a crash)
agora scores [--workers N]      the scores workers (vote counters, feeds, score frames)
agora dlq list|replay           what the workers dead-lettered; re-submit it once fixed
agora dev                       services + migrate + a gateway, a fan-out and a scores worker
agora token USER                a signed dev token (HS256, AGORA_JWT_SECRET)
agora shards fence --physical N --range LO-HI   during a shard move: refuse its writes there
agora shards unfence|status --physical N        take the fence down; show it
agora shards prune --physical N  after a shard move: drop rows mapped elsewhere (--apply)
agora posts recount POST_ID...  repair: set posts' vote counters from their vote rows
agora --version                 the version (also in GET /healthz)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from core.errors import ConfigError
from core.settings import Settings, environ_with
from gateway import __version__
from storage.shards import ShardMap


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
        ShardMap.from_settings(settings)  # the map against the databases
        return settings
    except ConfigError as exc:
        print(f"agora: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _logging(settings: Settings) -> None:
    from core import logs

    logs.configure(settings.log_level, settings.log_format)


def cmd_services(args: argparse.Namespace) -> int:
    from devstack import services

    state_dir = Path(args.state_dir)
    if args.action == "down":
        lines = services.down(state_dir)
    else:
        settings = _settings()
        if args.action == "up":
            lines = services.up(settings, state_dir)
            from fanout.kafka import ensure_topics
            from storage.migrate import migrate_all

            applied = asyncio.run(migrate_all(settings.shard_dsns))
            for shard, versions in applied.items():
                lines.append(f"migrations on {shard}: {versions or 'up to date'}")
            created = asyncio.run(ensure_topics(settings))
            lines.append(f"kafka topics created: {created or 'none (all exist)'}")
        else:
            lines = services.status(settings, state_dir)
    print("\n".join(lines))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from storage.migrate import migrate_all

    settings = _settings()
    applied = asyncio.run(migrate_all(settings.shard_dsns))
    for shard, versions in applied.items():
        print(f"{shard}: applied {versions}" if versions else f"{shard}: up to date")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway import server

    settings = _settings()
    _logging(settings)
    try:
        # Before any worker starts: a supervisor would restart one that died of it forever.
        server.check(settings, args.host)
    except ConfigError as exc:
        print(f"agora: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        child = ["gateway", "--host", args.host, "--port", str(args.port), "--workers", "1"]
        return server.supervise(child, args.workers)
    server.serve(settings, args.host, args.port)
    return 0


def _run_fanout_process(index: int = 0, restarts: int = 0) -> None:
    import uvloop

    from fanout.metrics import run_with_metrics
    from fanout.worker import run_worker

    settings = _settings()
    _logging(settings)
    uvloop.run(run_with_metrics(settings, "fanout", index, run_worker, restarts))


def cmd_fanout(args: argparse.Namespace) -> int:
    return _supervise(_run_fanout_process, args.workers, "fanout")


def _run_scores_process(index: int = 0, restarts: int = 0) -> None:
    import uvloop

    from fanout.metrics import run_with_metrics
    from fanout.scores import run_scores

    settings = _settings()
    _logging(settings)
    uvloop.run(run_with_metrics(settings, "scores", index, run_scores, restarts))


def cmd_scores(args: argparse.Namespace) -> int:
    return _supervise(_run_scores_process, args.workers, "scores")


def _supervise(target: Callable[[int, int], None], workers: int, role: str) -> int:
    """Run `target` in `workers` child processes (one by default), restarted when they die;
    each child gets its index (its metrics port is AGORA_METRICS_PORT + index)."""
    from fanout.supervisor import supervise

    settings = _settings()
    _logging(settings)
    return supervise(target, workers, role, settings.worker_restart_max_ms / 1000)


def cmd_dlq(args: argparse.Namespace) -> int:
    from fanout import deadletter

    settings = _settings()
    if args.action == "list":
        rows = asyncio.run(deadletter.read_all(settings, args.topic))
        print(f"{len(rows)} dead letters in {args.topic}")
        for partition, offset, d in rows:
            if d is None:
                print(f"{partition}:{offset}  (not a dead letter)")
                continue
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.at / 1000))
            print(
                f"{partition}:{offset}  {at}  from {d.topic}[{d.partition}]@{d.offset}  "
                f"error: {d.error}  value: {deadletter.preview(d.value)}"
            )
        return 0
    if not args.all and not args.offset:
        print("agora dlq replay: give --all or --offset N (repeatable)", file=sys.stderr)
        return 2
    done = asyncio.run(deadletter.replay(settings, args.topic, None if args.all else args.offset))
    for _p, offset, topic, partition, new_offset in done:
        print(f"{offset} -> {topic}[{partition}]@{new_offset}")
    print(f"replayed {len(done)} records")
    return 0


def _shard_ranges(text: str) -> list[int]:
    """`0-1023,2000-2047,4000` -> the logical shards it names."""
    shards: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a shard range: {part.strip()!r}") from None
        if first > last:
            raise argparse.ArgumentTypeError(f"empty shard range: {part.strip()!r}")
        shards.extend(range(first, last + 1))
    return shards


def cmd_shards(args: argparse.Namespace) -> int:
    """A logical shard move's steps on one physical database: the write fence for the
    switch (fence, unfence, status), then the rows it holds for shards mapped away (prune)."""
    from storage import fence
    from storage.pools import ShardPools
    from storage.reshard import prune

    settings = _settings()

    async def act(pools: ShardPools) -> int:
        n = args.physical
        if args.action == "fence":
            if not args.range:
                print("agora: shards fence needs --range LO-HI", file=sys.stderr)
                return 2
            try:
                await fence.fence(pools, n, args.range)
            except ValueError as exc:
                print(f"agora: {exc}", file=sys.stderr)
                return 2
            except fence.FenceBusy as exc:
                print(f"agora: not fenced: {exc}", file=sys.stderr)
                return 1
            print(f"physical {n}: fenced {_ranges_text(args.range)} and user-keyed writes")
        elif args.action == "unfence":
            try:
                was = await fence.unfence(pools, n)
            except fence.FenceBusy as exc:
                print(f"agora: {exc}", file=sys.stderr)
                return 1
            print(f"physical {n}: " + ("fence taken down" if was else "no fence stood"))
        elif args.action == "status":
            shards = await fence.fenced(pools, n)
            print(f"physical {n}: " + (f"fenced {_ranges_text(shards)}" if shards else "no fence"))
        else:
            result = await prune(pools, n, dry_run=not args.apply)
            verb = "deleted" if args.apply else "would delete (dry run; --apply deletes)"
            for table, rows in result.rows.items():
                print(f"physical {n} {table}: {verb} {rows} rows")
        return 0

    async def run() -> int:
        pools = ShardPools(settings)
        try:
            if not 0 <= args.physical < pools.physical_count:
                print(f"agora: no physical shard {args.physical}", file=sys.stderr)
                return 2
            return await act(pools)
        finally:
            await pools.close()

    return asyncio.run(run())


def _ranges_text(shards: list[int]) -> str:
    """[0, 1, 2, 7] -> '0-2,7'."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive shards
    for s in sorted(set(shards)):
        if runs and runs[-1][1] == s - 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def cmd_posts(args: argparse.Namespace) -> int:
    """Repair vote counters from the vote rows (the truth), with the scores workers stopped:
    deltas in flight would otherwise be counted twice. Feeds pick the new scores up at
    their next rebuild; the next vote on the post sends its score to the thread."""
    from core.errors import NotFound
    from storage.ids import parse_id
    from storage.pools import ShardPools
    from storage.posts import recount

    settings = _settings()
    ids = [parse_id(raw) for raw in args.post_ids]
    bad = [raw for raw, post in zip(args.post_ids, ids, strict=True) if post is None]
    if bad:
        print(f"agora: not a post id: {', '.join(bad)}", file=sys.stderr)
        return 2

    async def run() -> int:
        pools = ShardPools(settings)
        missing = 0
        try:
            for raw, post in zip(args.post_ids, ids, strict=True):
                assert post is not None
                try:
                    up, down = await recount(pools, post)
                except NotFound:
                    print(f"post {raw}: not found", file=sys.stderr)
                    missing += 1
                    continue
                print(f"post {raw}: up {up} down {down} score {up - down}")
        finally:
            await pools.close()
        return 1 if missing else 0

    return asyncio.run(run())


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.auth import make_token

    settings = _settings()
    if not settings.jwt_secret:
        print("agora: AGORA_JWT_SECRET is not set", file=sys.stderr)
        return 2
    print(
        make_token(
            settings.jwt_secret,
            args.user,
            args.name,
            args.ttl,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )
    return 0


def _next_metrics_port() -> dict[str, str]:
    """The environment for a second worker kind on this host: its metrics on the next port."""
    settings = _settings()
    if not settings.metrics_port:
        return environ_with({})
    return environ_with({"AGORA_METRICS_PORT": str(settings.metrics_port + 1)})


def cmd_dev(args: argparse.Namespace) -> int:
    """Engines up, schema applied, then a gateway, a fan-out and a scores worker until Ctrl-C."""
    services_args = argparse.Namespace(action="up", state_dir=args.state_dir)
    cmd_services(services_args)
    exe = [sys.executable, "-m", "gateway.cli"]
    # Dev mode for this gateway only (it binds 127.0.0.1): the demo's sign-in uses the
    # dev token endpoint. No file a deployment reads switches it on.
    dev_mode = environ_with({"AGORA_DEV_TOKENS": "true"})
    children = [
        subprocess.Popen([*exe, "gateway", "--port", str(args.port)], env=dev_mode),
        subprocess.Popen([*exe, "fanout"]),
        subprocess.Popen([*exe, "scores"], env=_next_metrics_port()),
    ]
    print(f"agora dev: gateway on http://127.0.0.1:{args.port} (Ctrl-C stops)")
    try:
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.wait(15)
            except subprocess.TimeoutExpired:
                c.kill()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"agora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("services", help="local engines for dev and tests")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--state-dir", default=".agora", help="where what was started is recorded")
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("migrate", help="apply migrations to every physical shard")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("gateway", help="run the WebSocket/HTTP gateway")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes; each is its own node")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("fanout", help="run fan-out workers on the messages topic")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_fanout)

    p = sub.add_parser("scores", help="run scores workers on the votes topic")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_scores)

    p = sub.add_parser("dlq", help="dead-lettered records: list them, replay them")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("--topic", choices=["messages", "votes"], default="messages")
    p.add_argument("--all", action="store_true", help="replay: every dead letter")
    p.add_argument(
        "--offset", type=int, action="append", default=[], help="replay: this DLQ offset"
    )
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("shards", help="moving logical shards (docs/operations.md)")
    p.add_argument("action", choices=["fence", "unfence", "status", "prune"])
    p.add_argument("--physical", type=int, required=True, help="index in AGORA_SHARD_DSNS")
    p.add_argument(
        "--range", type=_shard_ranges, help="fence: the logical shards, LO-HI[,LO-HI...]"
    )
    p.add_argument("--apply", action="store_true", help="prune: delete (default: count only)")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("posts", help="post maintenance (repair vote counters)")
    p.add_argument("action", choices=["recount"])
    p.add_argument("post_ids", nargs="+", metavar="POST_ID")
    p.set_defaults(func=cmd_posts)

    p = sub.add_parser("token", help="print a signed dev token")
    p.add_argument("user")
    p.add_argument("--name", default=None)
    p.add_argument("--ttl", type=int, default=24 * 3600, help="seconds")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("dev", help="run the whole dev stack in the foreground")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", default=".agora")
    p.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
