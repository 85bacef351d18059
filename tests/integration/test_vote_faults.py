"""The vote path under broker faults, with real processes and engines: a paused broker
holds no database connection and a retried vote counts once; a votes topic deleted and
recreated under a running scores worker loses no vote; and the migration to counted rows.

Each test runs its own Tansu (it pauses or rewrites it) and its own key and topic prefix;
the shard databases are the session's.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.settings import Settings
from devstack import services
from fanout.kafka import ensure_topics, votes_topic
from gateway.votes import PRODUCE_TIMEOUT_S
from storage import posts
from storage.migrate import load_migrations, migrate_database
from storage.pools import ShardPools
from tests.engines import free_port
from tests.integration.helpers import uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        yield client


@pytest.fixture
def broker() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    proc = services.start_tansu(
        "127.0.0.1", port, services.Path(f".agora/test/tansu-votes-{port}.log")
    )
    try:
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGCONT)  # a paused broker does not die of SIGKILL's wait
        proc.kill()
        proc.wait(10)


def own_stack(settings: Settings, bootstrap: str, **env: str) -> Stack:
    tag = f"vf{secrets.token_hex(3)}"
    return Stack(
        settings,
        extra_env={
            "AGORA_KAFKA_BOOTSTRAP": bootstrap,
            "AGORA_KAFKA_TOPIC_PREFIX": tag,
            "AGORA_REDIS_PREFIX": tag,
            **env,
        },
    )


class Voter:
    def __init__(self, http: httpx.AsyncClient, stack: Stack, node: Proc, user: str) -> None:
        self.http, self.node, self.user = http, node, user
        self.headers = {"Authorization": f"Bearer {stack.token(user)}"}

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(
            method, f"{self.node.http_url}{path}", headers=self.headers, **kw
        )

    async def vote(self, post: str, value: int) -> httpx.Response:
        return await self.call("PUT", f"/v1/posts/{post}/vote", json={"value": value})

    async def vote_until_ok(self, post: str, value: int, seconds: float = 60) -> int:
        """As docs/protocol.md tells a client: repeat an `unavailable` vote. Returns the
        number of attempts."""
        deadline = time.monotonic() + seconds
        attempts = 0
        while True:
            attempts += 1
            r = await self.vote(post, value)
            if r.status_code == 200:
                assert r.json()["my_vote"] == value
                return attempts
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
            assert time.monotonic() < deadline, f"vote of {self.user} never accepted"
            await asyncio.sleep(0.3)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def post_state(pools: ShardPools, post_id: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the counters, the counts of the rows' values) of a post, read together."""
    async with pools.transaction(pools.for_id(post_id)) as conn:
        row = await conn.fetchrow("SELECT up, down FROM posts WHERE id = $1", post_id)
        votes = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE value = 1) AS up,
                      count(*) FILTER (WHERE value = -1) AS down
               FROM votes WHERE post_id = $1""",
            post_id,
        )
    return (row["up"], row["down"]), (votes["up"], votes["down"])


async def idle_in_transaction(pools: ShardPools) -> int:
    """Connections of any process sitting in an open transaction on the shard databases."""
    total = 0
    for physical in range(pools.physical_count):
        async with pools.connection(physical) as conn:
            total += await conn.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND state LIKE 'idle in transaction%'"""
            )
    return total


async def test_paused_broker_holds_no_connection_and_a_retried_vote_counts_once(
    settings: Settings,
    pools: ShardPools,
    http: httpx.AsyncClient,
    broker: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, bootstrap = broker
    # Two connections per shard pool: six votes waiting on Kafka while holding one each
    # would leave every other request of the gateway waiting for a connection.
    s = own_stack(settings, bootstrap, AGORA_PG_POOL_MAX="2", AGORA_VOTE_SWEEP_S="3600")
    try:
        g = s.gateway("vf-pause-g")
        s.scores("vf-pause-scores")
        author = Voter(http, s, g, uid("author"))
        r = await author.call(
            "POST", "/v1/posts", json={"title": "t", "community": f"c_{secrets.token_hex(3)}"}
        )
        assert r.status_code == 201, r.text
        post = r.json()["id"]
        post_id = int(post)
        assert (await author.vote(post, 1)).status_code == 200  # the producer knows the topic

        async def counted_once() -> bool:
            counters, rows = await post_state(pools, post_id)
            return counters == rows == (1, 0)

        await wait_until(counted_once, 30, "the first vote counted")

        proc.send_signal(signal.SIGSTOP)
        voters = [Voter(http, s, g, uid(f"v{i}")) for i in range(6)]

        async def timed_vote(v: Voter) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            resp = await v.vote(post, 1)
            return resp, time.monotonic() - started

        tasks = [asyncio.create_task(timed_vote(v)) for v in voters]

        async def rows_stored() -> bool:
            return (await post_state(pools, post_id))[1] == (7, 0)

        await wait_until(rows_stored, 10, "the six vote rows stored")
        assert not any(t.done() for t in tasks), "a vote answered before the broker could ack"
        # The six votes are waiting on the broker now: the gateway still serves reads
        # that need a shard connection, at once, several at a time...
        started = time.monotonic()
        reads = await asyncio.gather(*(author.call("GET", f"/v1/posts/{post}") for _ in range(4)))
        read_s = time.monotonic() - started
        assert [x.status_code for x in reads] == [200] * 4, [x.text for x in reads]
        # ...and no transaction is open anywhere while they wait.
        assert await idle_in_transaction(pools) == 0
        assert not any(t.done() for t in tasks)
        answers = await asyncio.gather(*tasks)
        slowest = max(took for _, took in answers)
        print(
            f"\nbroker paused: 4 reads took {read_s:.2f}s while 6 votes waited; the votes "
            f"answered {sorted({a.status_code for a, _ in answers})} within {slowest:.2f}s"
        )
        assert all(a.status_code == 503 for a, _ in answers), [a.text for a, _ in answers]
        assert all(a.json()["error"]["code"] == "unavailable" for a, _ in answers)
        assert slowest < PRODUCE_TIMEOUT_S + 3
        assert (await post_state(pools, post_id))[0] == (1, 0)  # stored, not counted yet

        proc.send_signal(signal.SIGCONT)
        attempts = await asyncio.gather(*(v.vote_until_ok(post, 1) for v in voters))
        # A last vote after every retry was acknowledged: records of one post share a
        # partition, so once it is counted everything produced before it was read too
        # (the records the paused producer delivered late, and the retries).
        await Voter(http, s, g, uid("last")).vote_until_ok(post, 1)

        async def all_counted() -> bool:
            counters, rows = await post_state(pools, post_id)
            return counters == rows == (8, 0)

        settle_s = await wait_until(all_counted, 30, "counters equal to the rows")
        print(f"after the broker resumed: retries {attempts}, counted in {settle_s:.2f}s")
        async with pools.connection(pools.for_id(post_id)) as conn:
            pending = await conn.fetchval(
                "SELECT count(*) FROM votes WHERE post_id = $1 AND counted <> value", post_id
            )
        assert pending == 0
        got = (await author.call("GET", f"/v1/posts/{post}")).json()
        assert (got["up"], got["down"]) == (8, 0)
    finally:
        proc.send_signal(signal.SIGCONT)
        s.stop_all()


async def test_votes_topic_recreated_under_a_running_worker_loses_no_vote(
    settings: Settings,
    pools: ShardPools,
    http: httpx.AsyncClient,
    broker: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, bootstrap = broker
    s = own_stack(settings, bootstrap, AGORA_VOTE_SWEEP_S="1")
    # A commit of the worker's that meets the deleted topic fails (whether one falls in
    # that window is timing: seen 1 run in 3 under a CPU hog). aiokafka retries it, and
    # logs that at ERROR, which the worker process lowers to WARNING (fanout/consumer.py,
    # HandledCommitFailures): nothing to declare here, an ERROR line fails the test.
    topic_settings = settings.with_overrides(
        kafka_bootstrap=bootstrap, kafka_topic_prefix=s.extra_env["AGORA_KAFKA_TOPIC_PREFIX"]
    )
    topic = votes_topic(topic_settings)
    try:
        g = s.gateway("vf-topic-g")
        scores = s.scores("vf-topic-scores")
        author = Voter(http, s, g, uid("author"))
        r = await author.call(
            "POST", "/v1/posts", json={"title": "t", "community": f"c_{secrets.token_hex(3)}"}
        )
        assert r.status_code == 201, r.text
        post = r.json()["id"]
        post_id = int(post)

        def counted(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                counters, rows = await post_state(pools, post_id)
                return counters == rows == (n, 0)

            return check

        # The worker reads well into the topic: its position is past what the recreated
        # topic will hold at first, so records there would be skipped if offsets decided.
        first = [Voter(http, s, g, uid(f"a{i}")) for i in range(8)]
        for v in first:
            await v.vote_until_ok(post, 1)
        await wait_until(counted(8), 30, "the first votes counted")

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])

            async def gone() -> bool:
                return topic not in await admin.list_topics()

            await wait_until(gone, 15, "the votes topic deleted")
        finally:
            await admin.close()
        assert await ensure_topics(topic_settings) == [topic]

        second = [Voter(http, s, g, uid(f"b{i}")) for i in range(3)]
        for v in second:
            await v.vote_until_ok(post, 1)
        took = await wait_until(counted(11), 30, "votes after the recreation counted")
        print(f"\nvotes topic recreated: 3 new votes counted {took:.2f}s after the last one")
        assert scores.alive()

        # A vote stored but never produced (the record lost with the old topic, or a
        # gateway that died before producing): the gateways' sweep produces it.
        lost = await posts.vote(pools, post_id, uid("lost"), 1)
        assert lost.pending
        took = await wait_until(counted(12), 30, "a vote nobody produced counted")
        print(f"a vote with no record counted by the sweep in {took:.2f}s")

        # A worker restarted on the recreated topic (committed offsets gone or stale).
        scores.stop()
        scores = s.scores("vf-topic-scores2")
        await Voter(http, s, g, uid("c")).vote_until_ok(post, 1)
        await wait_until(counted(13), 30, "a vote after the worker's restart counted")
    finally:
        s.stop_all()


async def test_the_counted_migration_starts_from_rows_and_counters_that_agree(
    settings: Settings,
) -> None:
    # A database as it was before migration 0004, counters off from the rows the way the
    # old delta path could leave them (a delta counted without its row, one not counted).
    base = settings.shard_dsns[0].rsplit("/", 1)[0]
    dsn = f"{base}/agora_counted_{secrets.token_hex(3)}"
    await services.ensure_databases((dsn,))
    try:
        everything = load_migrations()
        await migrate_database(dsn, [m for m in everything if m.version < 4])
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                """INSERT INTO posts (id, author, community, title, thread_id, up, down)
                   VALUES (1, 'a', 'c', 't', 11, 5, 0), (2, 'a', 'c', 't', 12, 0, 0),
                          (3, 'a', 'c', 't', 13, 2, 2)"""
            )
            await conn.execute(
                """INSERT INTO votes (post_id, user_id, value) VALUES
                   (1, 'x', 1), (1, 'y', 1), (1, 'z', -1), (2, 'x', 0), (2, 'y', -1)"""
            )
            assert await migrate_database(dsn, everything) == [
                m.version for m in everything if m.version >= 4
            ]
            counters = await conn.fetch("SELECT id, up, down FROM posts ORDER BY id")
            assert [tuple(r) for r in counters] == [(1, 2, 1), (2, 0, 1), (3, 0, 0)]
            assert await conn.fetchval("SELECT count(*) FROM votes WHERE counted <> value") == 0
            assert await conn.fetchval("SELECT to_regclass('vote_offsets')") is None
        finally:
            await conn.close()
    finally:
        await services.drop_databases((dsn,))
