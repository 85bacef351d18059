"""The vote path: the voter's row on the post's shard, then a record naming it on the votes
topic. No database connection is held while Kafka is awaited.

How it stays exact (storage.posts has the SQL):
- The vote's transaction writes only the voter's row (`value`) and commits. Each row also
  keeps `counted`, the value the post's counters hold for it; a row with value != counted
  is a vote not counted yet ("pending").
- After the commit, a pending vote produces a record (post, voter), keyed by post. The
  record carries no delta: the scores worker locks the named rows, adds value - counted to
  the counters and sets counted = value, all in one transaction per shard. Counters are
  therefore always the sum of `counted` over the rows, whatever Kafka does: a record
  delivered twice, produced twice, or read again from a recreated topic whose offsets
  restarted at 0 finds its row counted and adds nothing.
- The broker does not ack in time (down, paused, slow): the row is stored, the answer is
  `unavailable`, and the connection went back to its pool before the produce started. A
  retry with the same value finds the row still pending and produces again (or finds it
  counted, because the first record arrived after all, and produces nothing): counted
  once either way.
- Nobody retries, or a record is lost with its topic: `sweep_forever` (one gateway at a
  time, by a Redis lock) re-produces rows pending for longer than the sweep interval, so a
  row and the counters never disagree for longer than the broker's outage plus about two
  intervals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core.errors import Unavailable
from fanout.envelope import Vote, encode_vote
from storage import posts
from storage.ids import now_ms
from storage.pools import ShardPools
from storage.posts import VoteResult

log = logging.getLogger("agora.gateway")
PRODUCE_TIMEOUT_S = 5.0
SWEEP_BATCH = 1000  # most pending votes one sweep re-produces per physical shard


def _retrieve(fut: asyncio.Future[object]) -> None:
    # A record given up on may still fail later; its error is already answered.
    if not fut.cancelled():
        fut.exception()


class VotePath:
    def __init__(
        self, pools: ShardPools, producer: AIOKafkaProducer, topic: str, sweep_s: float = 10
    ) -> None:
        self.pools = pools
        self.producer = producer
        self.topic = topic
        self.sweep_s = sweep_s
        self.produced = 0
        self.swept = 0  # records re-produced by sweeps

    async def vote(self, user: str, post_id: int, value: int) -> VoteResult:
        result = await posts.vote(self.pools, post_id, user, value)
        if result.pending:
            await self._produce([(post_id, user)])
        return result

    async def _produce(self, voters: Sequence[tuple[int, str]]) -> None:
        """Produce one record per (post, voter) and wait for every ack, at most
        PRODUCE_TIMEOUT_S in all; Unavailable when the broker did not take them all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PRODUCE_TIMEOUT_S
        acks: list[asyncio.Future[object]] = []
        try:
            for post, user in voters:
                record = encode_vote(Vote(post, user, now_ms()))
                # Keyed by post: one post's records stay in one partition, so one scores
                # worker counts them and its `score` frames leave in the order reached.
                ack = await asyncio.wait_for(
                    self.producer.send(self.topic, record, key=str(post).encode()),
                    max(0.0, deadline - loop.time()),
                )
                ack.add_done_callback(_retrieve)
                acks.append(ack)
            # Not cancelled on timeout: the producer may still deliver them, which is
            # harmless (a record counts a row at most once).
            _, waiting = await asyncio.wait(acks, timeout=max(0.0, deadline - loop.time()))
            if waiting:
                raise TimeoutError
            for ack in acks:
                ack.result()
        except (KafkaError, TimeoutError) as exc:
            raise Unavailable(
                f"message broker unavailable ({type(exc).__name__}): the vote is stored and "
                "will be counted; repeating it is safe"
            ) from None
        self.produced += len(voters)

    async def sweep(self) -> int:
        """Re-produce the votes pending for longer than `sweep_s` (their record was lost or
        never acknowledged); returns how many. A shard or the broker failing is logged and
        left to the next sweep."""
        total = 0
        for physical in range(self.pools.physical_count):
            try:
                async with self.pools.connection(physical) as conn:
                    voters = await posts.pending_votes(conn, self.sweep_s, SWEEP_BATCH)
                if voters:
                    await self._produce(voters)
                    total += len(voters)
            except Exception as exc:
                log.warning("vote sweep of shard %s failed: %s", self.pools.names[physical], exc)
        if total:
            log.info("vote sweep re-produced %d pending votes", total)
        self.swept += total
        return total

    async def sweep_forever(self, redis: aioredis.Redis, lock_key: str) -> None:
        """Every `sweep_s`, sweep if this gateway holds the lock for this interval (one
        sweeper for the cluster; another gateway takes over when this one is gone)."""
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                mine = await redis.set(lock_key, b"1", nx=True, ex=max(1, int(self.sweep_s)))
            except (aioredis.RedisError, OSError) as exc:
                log.warning("vote sweep skipped: %s", exc)
                continue
            if mine:
                await self.sweep()
