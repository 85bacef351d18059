"""The scores worker: votes topic batch -> counters -> feed sets -> `score` frames -> commit.

Votes reach Kafka as deltas keyed by post, so one post's deltas are in one partition and
one worker of the group owns them. Per batch the worker sums the deltas per post and
writes one counter UPDATE per post (one transaction per physical shard), so a post that
gets a thousand votes a second is a few row writes a second, not a thousand contending
locks. Then it re-ranks the posts in the feed sets, publishes the new totals to the gateway
nodes whose clients follow each post's thread, and only then commits the offsets.

Exactly once: a record only names a vote row (post, voter); each shard's transaction counts
the named rows whose value is not in the counters yet and marks them counted (`counted`,
storage.posts.count_votes). A record that Kafka delivers again (the worker died after the
database commit, before the offset commit; a rebalance; a retry after Redis failed), a
record produced twice (a retried vote, the gateways' sweep) or a votes topic recreated with
its offsets back at 0 counts nothing twice and skips nothing: no offsets are consulted.

Failures, as in the fan-out worker: a shard that is down holds back only its own votes
(kept and retried while the other shards go on; the committed offset of a partition stops
at its oldest held record); Redis down holds the whole batch (the shards that committed
skip it when retried, and their totals are sent then).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from asyncpg.exceptions import TransactionRollbackError

from fanout.consumer import commit, run_consumer_process
from fanout.envelope import Delivery, EnvelopeError, Score, Vote, decode_vote
from fanout.feeds import FeedCache
from fanout.kafka import scores_group, votes_topic
from fanout.routing import Routes
from storage import posts
from storage.errors import Unavailable
from storage.pools import ShardPools
from storage.posts import Totals
from storage.redis_keys import RedisKeys
from storage.settings import Settings

log = logging.getLogger("agora.scores")
MAX_HELD = 100_000  # beyond this, stop taking new records until the shard is back
RETRY_PAUSE_S = 0.5


@dataclass(frozen=True, slots=True)
class Pending:
    tp: TopicPartition
    offset: int
    vote: Vote


class ScoresWorker:
    def __init__(
        self,
        settings: Settings,
        pools: ShardPools,
        redis: aioredis.Redis,
        consumer: AIOKafkaConsumer,
    ) -> None:
        self.settings = settings
        self.pools = pools
        self.topic = votes_topic(settings)
        keys = RedisKeys(settings.redis_prefix)
        self.routes = Routes(redis, keys)
        self.feeds = FeedCache(redis, keys, pools)
        self.consumer = consumer
        self.stopping = asyncio.Event()
        self.held: list[Pending] = []  # votes whose shard (or Redis) failed, oldest first
        self.batches = 0
        self.votes = 0
        self.updates = 0  # counter UPDATEs of a post (at most one per post per batch)

    async def run(self) -> None:
        while not self.stopping.is_set():
            if len(self.held) >= MAX_HELD:
                records = {}
                await asyncio.sleep(RETRY_PAUSE_S)
            else:
                # With votes held, come back soon to retry them even if no new ones arrive.
                records = await self.consumer.getmany(
                    timeout_ms=100 if self.held else 200,
                    max_records=self.settings.fanout_batch_max,
                )
            if records or self.held:
                await self.handle(records)

    async def handle(self, records: dict[TopicPartition, list]) -> None:  # type: ignore[type-arg]
        fresh: list[Pending] = []
        last: dict[TopicPartition, int] = {}
        for tp, recs in records.items():
            last[tp] = recs[-1].offset
            for rec in recs:
                try:
                    vote = decode_vote(rec.value)
                except EnvelopeError as exc:
                    # Poison record: log and skip it rather than block the partition forever.
                    log.error("skipping record %s@%d: %s", tp, rec.offset, exc)
                    continue
                fresh.append(Pending(tp, rec.offset, vote))
        owned = self.consumer.assignment()
        # Held votes of partitions taken away by a rebalance belong to their new owner.
        work = [p for p in self.held if p.tp in owned] + fresh
        if not work:
            await self._commit(last, [])
            return
        totals, failed, errors = await self.apply(work)
        try:
            await self.feeds.on_totals(totals)
            await self.publish(totals)
        except (OSError, aioredis.RedisError) as exc:
            # The counters are stored; the feeds and subscribers are not told yet. Hold it
            # all: on the retry the shards skip what they have and send their totals.
            log.warning("batch of %d votes: Redis failed (%s); retrying", len(work), exc)
            self.held = work
            await self._commit(last, work)
            await asyncio.sleep(RETRY_PAUSE_S)
            return
        self.held = failed
        if errors:
            log.warning("%d votes held: %s", len(failed), "; ".join(e.message for e in errors))
        await self._commit(last, failed)
        self.batches += 1
        self.votes += len(work) - len(failed)
        self.updates += len(totals)
        if failed and not fresh:
            await asyncio.sleep(RETRY_PAUSE_S)

    async def apply(
        self, work: list[Pending]
    ) -> tuple[list[Totals], list[Pending], list[Unavailable]]:
        """Apply the deltas, one transaction per physical shard, shards in parallel.

        Returns (totals of the posts touched, votes of the shards that failed, their
        errors). A shard that is down, or whose transaction was aborted by a deadlock or
        serialization failure, fails only its own votes.
        """
        by_shard: dict[int, list[Pending]] = defaultdict(list)
        for p in work:
            by_shard[self.pools.for_id(p.vote.post)].append(p)
        shards = list(by_shard)
        parts = await asyncio.gather(
            *(self._apply_shard(s, by_shard[s]) for s in shards), return_exceptions=True
        )
        totals: list[Totals] = []
        failed: list[Pending] = []
        errors: list[Unavailable] = []
        for physical, part in zip(shards, parts, strict=True):
            if isinstance(part, TransactionRollbackError):
                part = Unavailable(f"shard {self.pools.names[physical]}: {part}")
            if isinstance(part, Unavailable):
                failed.extend(by_shard[physical])
                errors.append(part)
            elif isinstance(part, BaseException):
                raise part
            else:
                totals.extend(part)
        failed.sort(key=lambda p: (p.tp.partition, p.offset))
        return totals, failed, errors

    async def _apply_shard(self, physical: int, work: list[Pending]) -> list[Totals]:
        # Records name vote rows; what is counted is each row's value not counted yet
        # (storage.posts.count_votes), so records seen before, or twice, add nothing.
        async with self.pools.transaction(physical) as conn:
            deltas = await posts.count_votes(conn, ((p.vote.post, p.vote.user) for p in work))
            totals = await posts.apply_deltas(conn, deltas)
            # Posts whose votes were already counted (a retried batch, a record produced
            # again): their totals may never have reached the feeds and subscribers.
            redone = {p.vote.post for p in work} - deltas.keys()
            if redone:
                totals += await posts.totals_of(conn, redone)
        return totals

    async def _commit(self, last: dict[TopicPartition, int], held: list[Pending]) -> None:
        await commit(self.consumer, last, ((p.tp, p.offset) for p in held))

    async def publish(self, totals: list[Totals]) -> None:
        """One delivery per gateway node with the new totals of the threads it follows."""
        live = [t for t in totals if not t.deleted]
        if not live:
            return
        nodes, _ = await self.routes.nodes_for(convs={t.thread for t in live})
        deliveries: dict[str, Delivery] = {}
        for t in live:
            score = Score(t.id, t.thread, t.up - t.down, t.up, t.down)
            for node in nodes.get(t.thread, ()):
                deliveries.setdefault(node, Delivery()).scores.append(score)
        await self.routes.publish(deliveries)


async def run_scores(settings: Settings) -> None:
    """A scores worker process."""
    worker = await run_consumer_process(
        settings,
        votes_topic(settings),
        scores_group(settings),
        lambda pools, redis, consumer: ScoresWorker(settings, pools, redis, consumer),
        "scores",
    )
    assert isinstance(worker, ScoresWorker)
    log.info(
        "scores worker stopped after %d batches, %d votes, %d counter updates",
        worker.batches,
        worker.votes,
        worker.updates,
    )
