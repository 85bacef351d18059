"""An engine's server stops and starts while traffic runs over two gateways and a
supervised fan-out worker: a shard's PostgreSQL (`pg_ctl stop -m fast`, ~3 s, start) and
Redis (SIGKILL, started again empty on the same port). Each ends with every acked message
stored exactly once and delivered once, in seq order, to every subscriber, and every Agora
process alive with no traceback in its log.

The engines stopped are the test's own (tests/faults.py), never the session's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from core.settings import Settings
from storage import messages
from storage.pools import ShardPools
from tests.faults import OwnPostgres, OwnRedis, private_shard
from tests.integration.helpers import create_group, uid
from tests.integration.test_faults import Follower, report, send_steadily, user_on
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def check_exactly_once(
    pools: ShardPools,
    label: str,
    conv: str,
    count: int,
    sent: tuple[list[str], int],
    followers: list[Follower],
) -> None:
    acked, failures = sent
    assert len(acked) == count, f"{label}: {len(acked)} of {count} acked"
    stored = await messages.after(pools, int(conv), 0, 10_000)
    for f in followers:
        report(f"{label} {f.user} (failed attempts {failures})", count, acked, f.seqs, len(stored))
    assert sorted(str(m.id) for m in stored) == sorted(acked)  # stored once, under its id
    assert [m.seq for m in stored] == list(range(1, count + 1))
    for f in followers:
        assert f.seqs == list(range(1, count + 1)), f"{f.user}: {len(f.seqs)} seqs"


def assert_clean(procs: list[Proc]) -> None:
    for p in procs:
        assert p.alive(), f"{p.name} exited with {p.popen.returncode}"
        log = p.log_text()
        assert "Traceback" not in log, f"{p.name}: traceback in its log"
        assert "restarting" not in log, f"{p.name}: its worker was restarted"


@pytest.fixture
def own_shard(settings: Settings) -> Iterator[tuple[Settings, OwnPostgres]]:
    with private_shard(settings) as (two, pg):
        yield two, pg


async def test_shard_postgres_stopped_and_started_with_traffic_loses_nothing(
    own_shard: tuple[Settings, OwnPostgres], http: httpx.AsyncClient
) -> None:
    two, pg = own_shard
    pools = ShardPools(two)
    s = Stack(two)
    try:
        g1, g2 = s.gateway("pr-g1"), s.gateway("pr-g2")
        w = s.fanout("pr-f")
        up_owner, down_owner = user_on(pools, 0, "up"), user_on(pools, 1, "down")
        readers = [uid("r") for _ in range(2)]
        conv_up = await create_group(http, s, g1, up_owner, readers)
        conv_down = await create_group(http, s, g2, down_owner, readers)
        assert (pools.for_id(int(conv_up)), pools.for_id(int(conv_down))) == (0, 1)
        followers = {
            c: [Follower(s, [g1, g2] if i % 2 else [g2, g1], r, c) for i, r in enumerate(readers)]
            for c in (conv_up, conv_down)
        }
        for f in followers[conv_up] + followers[conv_down]:
            f.start()
        await asyncio.sleep(1.0)
        count = 500
        sending = {
            c: asyncio.create_task(send_steadily(s, [g1, g2], owner, c, count, 0.01))
            for c, owner in ((conv_up, up_owner), (conv_down, down_owner))
        }
        down_f = followers[conv_down][0]
        await wait_for(lambda: len(down_f.seqs) >= 20, 30, "traffic to flow")
        assert not sending[conv_up].done()
        pg.stop("fast")
        down_at = time.monotonic()
        await asyncio.sleep(3)
        up_at = time.monotonic()
        pg.start()
        print(f"shard #1 down {up_at - down_at:.1f}s")
        # The healthy shard's conversation kept flowing while the other was down.
        for f in followers[conv_up]:
            during = [t for t in f.times if down_at < t < up_at]
            print(f"{f.user}: {len(during)} deliveries on shard #0 while #1 was down")
            assert len(during) >= 20
        results = {c: await t for c, t in sending.items()}
        everyone = followers[conv_up] + followers[conv_down]
        await wait_for(lambda: all(len(f.seqs) >= count for f in everyone), 60, "deliveries")
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        for f in everyone:
            await f.finish()
        for c, label in ((conv_up, "shard #0"), (conv_down, "shard #1 restarted")):
            await check_exactly_once(pools, label, c, count, results[c], followers[c])
        assert results[conv_down][1] > 0, "no send met the outage: nothing was tested"
        assert_clean([g1, g2, w])
    finally:
        s.stop_all()
        await pools.close()


async def test_redis_killed_and_restarted_with_traffic_loses_nothing(
    settings: Settings, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    redis = OwnRedis()
    redis.start()
    s = Stack(settings, extra_env={"AGORA_REDIS_URL": redis.url, "AGORA_ROUTE_LEASE_S": "3"})
    try:
        g1, g2 = s.gateway("rr-g1"), s.gateway("rr-g2")
        w = s.fanout("rr-f")
        senders = [uid("s") for _ in range(2)]
        readers = [uid("r") for _ in range(2)]
        convs = [await create_group(http, s, g1, u, readers) for u in senders]
        followers = {
            c: [Follower(s, [g1, g2] if i % 2 else [g2, g1], r, c) for i, r in enumerate(readers)]
            for c in convs
        }
        everyone = [f for fs in followers.values() for f in fs]
        for f in everyone:
            f.start()
        await asyncio.sleep(1.0)
        count = 400
        sending = {
            c: asyncio.create_task(send_steadily(s, [g1, g2], u, c, count, 0.01))
            for u, c in zip(senders, convs, strict=True)
        }
        await wait_for(lambda: len(everyone[0].seqs) >= 20, 30, "traffic to flow")
        redis.kill()  # SIGKILL, no persistence: it comes back empty
        await asyncio.sleep(1.0)
        redis.start()  # the same port
        print("redis killed and started again (empty)")
        results = {c: await t for c, t in sending.items()}
        await wait_for(lambda: all(len(f.seqs) >= count for f in everyone), 60, "deliveries")
        await asyncio.sleep(0.5)
        for f in everyone:
            await f.finish()
        for c in convs:
            await check_exactly_once(pools, "redis restart", c, count, results[c], followers[c])
        print(f"follower reconnects: {sum(f.reconnects for f in everyone)}")
        assert_clean([g1, g2, w])
    finally:
        s.stop_all()
        redis.kill()
