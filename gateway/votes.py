"""The vote path: the voter's row on the post's shard, and the delta to the votes topic.

The delta is produced *inside* the vote's database transaction (storage.posts.vote calls
back before committing) and the transaction commits only after Kafka acknowledged it:
- Kafka down: the vote is rolled back and answered `unavailable`; nothing changed.
- A repeated vote changes no row and produces nothing.
What remains is the window between Kafka's ack and the commit (the shard dies in between,
or the ack times out after the broker stored the record): the delta is then counted without
its row. `storage.posts.recount` repairs a post from its vote rows.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from fanout.envelope import Vote, encode_vote
from storage import posts
from storage.errors import Unavailable
from storage.ids import now_ms
from storage.pools import ShardPools
from storage.posts import VoteChange, VoteResult

PRODUCE_TIMEOUT_S = 5.0


class VotePath:
    def __init__(self, pools: ShardPools, producer: AIOKafkaProducer, topic: str) -> None:
        self.pools = pools
        self.producer = producer
        self.topic = topic
        self.produced = 0

    async def vote(self, user: str, post_id: int, value: int) -> VoteResult:
        return await posts.vote(self.pools, post_id, user, value, self._produce)

    async def _produce(self, change: VoteChange) -> None:
        record = encode_vote(Vote(change.post, change.up, change.down, now_ms()))
        try:
            # Keyed by post: one post's deltas stay in one partition, so one scores worker
            # sums them and its `score` frames leave in the order the totals were reached.
            fut = await asyncio.wait_for(
                self.producer.send(self.topic, record, key=str(change.post).encode()),
                PRODUCE_TIMEOUT_S,
            )
            await asyncio.wait_for(fut, PRODUCE_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            raise Unavailable(f"message broker unavailable: {type(exc).__name__}") from None
        self.produced += 1
