"""A consumer's position of a partition, read without waiting.

`AIOKafkaConsumer.position` is a coroutine because a partition whose position is not known
yet (just assigned, or reset) waits for it; once the partition has been fetched it returns
at once, from memory. The workers read every owned partition's position after every fetch
round (fanout.holding: the skip at a fetch's end and the stall watch) and for the lag gauge
(fanout.metrics). Awaited, with a timeout around each call, that cost a busy fan-out worker
about a tenth of its CPU per batch (bench/RESULTS.md, issue 14, "Where the worker's
per-batch CPU goes"): a timer armed and cancelled per partition per round. Here the
coroutine is run by hand up to its first suspension: it either ends there (the position)
or would wait (no position yet: None, and the coroutine is closed, which removes what it
was waiting on). Only the public method is used, so a later aiokafka that computes the
position differently is still read right.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError


def position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position of `tp` if it is known now; None if the partition is not
    assigned (a rebalance took it) or has no position yet (nothing fetched to check)."""
    step = consumer.position(tp)
    try:
        step.send(None)
    except StopIteration as done:
        position: int = done.value
        return position
    except (IllegalStateError, KafkaError):
        return None
    step.close()  # it would wait: not now
    return None
