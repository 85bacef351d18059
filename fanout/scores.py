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

Failures, as in the fan-out worker (the loop is `fanout.holding`'s): a shard that is down
or fails transiently (by SQLSTATE, `storage.pgerrors`) holds back only its own votes (kept
and retried with backoff while the other shards go on; the committed offset of a partition
stops at its oldest held record); Redis down holds the whole batch (the shards that
committed skip it when retried, and their totals are sent then). A vote no database will
take (a data error) or a record that does not decode goes to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, replace

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.errors import NotFound, Unavailable
from core.settings import Settings
from fanout.consumer import run_consumer_process
from fanout.deadletter import DeadLetters
from fanout.envelope import Delivery, EnvelopeError, Score, Vote, decode_vote
from fanout.feeds import FeedCache
from fanout.holding import HoldingWorker, Outcome, PoisonRecord, Raw, Record, fenced_key
from fanout.kafka import scores_group, votes_topic
from fanout.routing import Routes
from storage import posts
from storage.fence import fenced as fenced_shards
from storage.ids import shard_of_id
from storage.pgerrors import FENCED, Fault, classify, describe, sqlstate
from storage.pools import ShardPools
from storage.posts import Totals
from storage.redis_keys import RedisKeys

log = logging.getLogger("agora.scores")
MAX_HELD = 100_000  # beyond this, stop taking new records until the shard is back


# (totals, held votes, (shard name, error) per failed shard, (poison vote, why))
Applied = tuple[
    list[Totals], list["Pending"], list[tuple[str, Unavailable]], list[tuple["Pending", str]]
]


@dataclass(frozen=True, slots=True)
class Pending:
    tp: TopicPartition
    offset: int
    vote: Vote


class ScoresWorker(HoldingWorker[Pending]):
    group = "scores"

    def __init__(
        self,
        settings: Settings,
        pools: ShardPools,
        redis: aioredis.Redis,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        super().__init__(settings, consumer, dead_letters)
        self.pools = pools
        self.topic = votes_topic(settings)
        keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
        self.routes = Routes(redis, keys)
        self.feeds = FeedCache(redis, keys, pools)
        self.max_held = MAX_HELD
        self.updates = 0  # counter UPDATEs of a post (at most one per post per batch)

    def decode(self, raw: Raw) -> Pending:
        try:
            vote = decode_vote(raw.value)
        except EnvelopeError as exc:
            raise PoisonRecord(str(exc)) from None
        return Pending(raw.tp, raw.offset, vote)

    def hold_key(self, item: Pending) -> str:
        try:
            return self.pools.names[self.pools.for_id(item.vote.post)]
        except NotFound:
            raise PoisonRecord(f"post id {item.vote.post} names no shard") from None

    async def apply_batch(self, work: list[Record[Pending]]) -> Outcome[Pending]:
        totals, failed, errors, poison = await self.apply([r.item for r in work])
        by_vote = {id(r.item): r for r in work}
        # Votes a move's fence refused wait per logical shard (their key is among the
        # errors), the others for their database.
        keys = {key for key, _ in errors}
        out: Outcome[Pending] = Outcome(
            held=[replace(by_vote[id(p)], hold=self._held_key(p, keys)) for p in failed],
            poison=[(by_vote[id(p)], why) for p, why in poison],
            failures={name: e.message for name, e in errors},
        )
        try:
            await self.feeds.on_totals(totals)
            await self.publish(totals)
        except (OSError, aioredis.RedisError) as exc:
            # The counters are stored; the feeds and subscribers are not told yet. Hold it
            # all: on the retry the shards skip what they have and send their totals.
            left = {id(p) for p in failed} | {id(p) for p, _ in poison}
            out.held += [replace(r, hold="redis") for r in work if id(r.item) not in left]
            out.failures["redis"] = repr(exc)
            return out
        self.updates += len(totals)
        return out

    def _held_key(self, p: Pending, keys: set[str]) -> str:
        key = fenced_key(shard_of_id(p.vote.post))
        return key if key in keys else self.hold_key(p)

    async def apply(
        self, work: list[Pending]
    ) -> tuple[
        list[Totals], list[Pending], list[tuple[str, Unavailable]], list[tuple[Pending, str]]
    ]:
        """Apply the deltas, one transaction per physical shard, shards in parallel.

        Returns (totals of the posts touched, votes of the shards that failed transiently,
        (shard name, error) per failed shard, poison votes and why). A shard that is down,
        or whose transaction failed transiently (deadlock, serialization failure, timeout,
        read-only: by SQLSTATE), fails only its own votes; a shard whose transaction hit a
        data error applies its votes one by one to find the poison. A shard whose
        transaction a move's fence refused fails only the votes of the fenced logical
        shards (under `fenced_key`, in place of the shard name); the rest are applied.
        """
        by_shard: dict[int, list[Pending]] = defaultdict(list)
        for p in work:
            by_shard[self.pools.for_id(p.vote.post)].append(p)
        shards = list(by_shard)
        # Nothing cancels one shard's part alone: cancelling the batch cancels the gather
        # itself (it raises here), so every part is totals or an Exception.
        parts = await asyncio.gather(
            *(self._apply_shard(s, by_shard[s]) for s in shards), return_exceptions=True
        )
        totals: list[Totals] = []
        failed: list[Pending] = []
        errors: list[tuple[str, Unavailable]] = []
        poison: list[tuple[Pending, str]] = []
        for physical, part in zip(shards, parts, strict=True):
            name = self.pools.names[physical]
            if not isinstance(part, BaseException):
                totals.extend(part)
            elif sqlstate(part) == FENCED:
                got, held, errs, bad = await self._around_fence(physical, by_shard[physical], part)
                totals += got
                failed += held
                errors += errs
                poison += bad
            elif classify(part) is Fault.POISON:
                got, held, bad, why = await self._isolate(physical, by_shard[physical])
                totals += got
                failed += held
                poison += bad
                if why is not None:
                    errors.append((name, Unavailable(f"shard {name}: {why}")))
            else:
                failed.extend(by_shard[physical])
                errors.append((name, Unavailable(f"shard {name}: {describe(part)}")))
        failed.sort(key=lambda p: (p.tp.partition, p.offset))
        return totals, failed, errors, poison

    async def _around_fence(
        self, physical: int, votes: list[Pending], exc: BaseException
    ) -> Applied:
        """A move's fence refused `votes`: those of the fenced logical shards fail (each
        shard under its own key), the others are applied now. Votes are counted whatever
        their order (storage.posts.count_votes), so nothing else has to wait."""
        name = self.pools.names[physical]
        try:
            shards = set(await fenced_shards(self.pools, physical) or ())
        except Exception as err:
            return [], votes, [(name, Unavailable(f"shard {name}: {describe(err)}"))], []
        fenced = [p for p in votes if shard_of_id(p.vote.post) in shards]
        if not fenced:
            # Lifted or changed since: the retry, after the database's backoff, tells.
            return [], votes, [(name, Unavailable(f"shard {name}: {describe(exc)}"))], []
        why = Unavailable(f"shard {name}: {describe(exc)}")
        keys = {fenced_key(shard_of_id(p.vote.post)) for p in fenced}
        free = [p for p in votes if shard_of_id(p.vote.post) not in shards]
        totals, failed, errors, poison = await self.apply(free) if free else ([], [], [], [])
        return totals, fenced + failed, [(k, why) for k in sorted(keys)] + errors, poison

    async def _isolate(
        self, physical: int, votes: list[Pending]
    ) -> tuple[list[Totals], list[Pending], list[tuple[Pending, str]], str | None]:
        """One transaction per vote, in offset order, to tell the poison from the rest; a
        transient error on the way holds that vote and the later ones."""
        totals: list[Totals] = []
        poison: list[tuple[Pending, str]] = []
        ordered = sorted(votes, key=lambda p: (p.tp.partition, p.offset))
        for i, p in enumerate(ordered):
            try:
                totals += await self._apply_shard(physical, [p])
            except Exception as exc:
                if classify(exc) is not Fault.POISON:
                    return totals, ordered[i:], poison, describe(exc)
                poison.append((p, describe(exc)))
        return totals, [], poison, None

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
        lambda pools, redis, consumer, dlq: ScoresWorker(settings, pools, redis, consumer, dlq),
        "scores",
    )
    assert isinstance(worker, ScoresWorker)
    log.info(
        "scores worker stopped after %d batches, %d votes, %d counter updates, %d dead-lettered",
        worker.batches,
        worker.done,
        worker.updates,
        worker.dead_lettered,
    )
