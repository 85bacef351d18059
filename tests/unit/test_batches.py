"""gateway/batches.py: jobs merged by key, one batch in flight, bounded, retried with backoff
(no I/O: the flush is a function of the test)."""

from __future__ import annotations

import asyncio
import operator

from gateway.batches import Backoff, Batcher, Pending
from gateway.routesync import _take
from tests.cancels import SwallowsOneCancel


def test_jobs_of_one_key_merge_and_are_taken_oldest_first_up_to_the_limit() -> None:
    p: Pending[str, int] = Pending(operator.add)
    for user in ["a", "b", "a", "c", "a", "d"]:
        p.add(user, 1)
    assert len(p) == 4 and p.get("a") == 3 and p.get("zz") is None
    assert p.take(3) == {"a": 3, "b": 1, "c": 1}
    assert len(p) == 1
    assert p.take(3) == {"d": 1}
    assert p.take(3) == {} and len(p) == 0


def test_a_failed_batch_goes_back_ahead_of_newer_jobs_and_merges_with_them() -> None:
    p: Pending[str, int] = Pending(operator.add)
    p.add("a", 1)
    p.add("b", 2)
    batch = p.take(10)
    p.add("c", 1)  # arrived while the batch was in flight
    p.add("a", 5)
    p.put_back(batch)
    assert p.take(10) == {"a": 6, "b": 2, "c": 1}  # nothing lost, nothing counted twice
    assert list(batch) == ["a", "b"]


def test_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    b = Backoff(0.05, 0.3)
    assert [b.failed() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    assert b.streak == 5
    b.succeeded()
    assert b.streak == 0 and b.failed() == 0.05


def test_take_bounds_a_set_and_removes_what_it_took() -> None:
    items = set(range(10))
    taken = _take(items, 4)
    assert len(taken) == 4 and not taken & items and taken | items == set(range(10))
    assert _take(items, 0) == set() and len(items) == 6
    assert _take(items, 100) == set(range(10)) - taken and items == set()


async def test_jobs_queued_while_a_batch_is_in_flight_go_out_together_bounded() -> None:
    sent: list[dict[str, int]] = []
    gate = asyncio.Event()

    async def flush(batch: dict[str, int]) -> None:
        sent.append(batch)
        await gate.wait()

    b: Batcher[str, int] = Batcher("test jobs", flush, operator.add, max_batch=100)
    b.add("first", 1)
    await asyncio.sleep(0)
    assert sent == [{"first": 1}]  # a lone job goes out at once: no timer
    for i in range(250):
        b.add(f"u{i % 120}", 1)  # 120 keys, 250 jobs
    gate.set()
    await asyncio.wait_for(b.idle(), 1)
    assert [len(s) for s in sent] == [1, 100, 20]
    merged: dict[str, int] = {}
    for s in sent[1:]:
        for k, v in s.items():
            merged[k] = merged.get(k, 0) + v
    assert sum(merged.values()) == 250 and merged["u0"] == 3 and merged["u119"] == 2
    assert b.batches == 3 and b.jobs == 121


async def test_a_failing_flush_is_retried_with_backoff_until_it_succeeds() -> None:
    tries: list[dict[str, int]] = []

    async def flush(batch: dict[str, int]) -> None:
        tries.append(dict(batch))
        if len(tries) <= 3:
            raise ConnectionError("No connection available.")

    b: Batcher[str, int] = Batcher("test jobs", flush, operator.add, backoff=Backoff(0.001, 0.004))
    b.add("a", 1)
    await asyncio.sleep(0)
    b.add("a", 1)  # during the failures: merged into the retried batch
    b.add("b", 1)
    await asyncio.wait_for(b.idle(), 1)
    assert tries[0] == {"a": 1}
    assert tries[-1] == {"a": 2, "b": 1}  # the last try carried every job
    assert len(tries) == 4 and b.failures == 3 and b.backoff.streak == 0


async def test_stop_gives_up_after_its_timeout_while_redis_is_gone() -> None:
    async def flush(batch: dict[str, int]) -> None:
        raise ConnectionError("gone")

    b: Batcher[str, int] = Batcher("test jobs", flush, operator.add, backoff=Backoff(0.01, 0.01))
    b.add("a", 1)
    await asyncio.wait_for(b.stop(timeout=0.05), 1)
    assert b.pending.get("a") == 1  # kept, not sent: the caller's comment says what then


async def test_stop_ends_a_batch_whose_flush_swallowed_the_cancellation() -> None:
    # As redis-py 8.1's pipeline does with a cancellation that lands as it starts: the
    # flush goes on (and fails: Redis is away), the batch is put back and retried after
    # its backoff, for ever. `stop` cancelled once and awaited the task: it never returned.
    stubborn = SwallowsOneCancel()

    async def flush(batch: dict[str, int]) -> None:
        await stubborn.sleep()
        raise ConnectionError("gone")

    b: Batcher[str, int] = Batcher("test jobs", flush, operator.add, backoff=Backoff(0.01, 0.01))
    b.add("a", 1)
    await stubborn.sleeping.wait()
    stopping = asyncio.ensure_future(b.stop(timeout=0.01))
    # Not wait_for: cancelling `stop` would cancel the task it awaits, and end the test.
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert stopping in done and stubborn.swallowed == 1
    assert b.pending.get("a") == 1 and b._task is None


async def test_with_a_linger_the_jobs_of_the_next_ticks_join_the_first_batch() -> None:
    """Presence's batches linger (gateway/presence.py): jobs added a few loop turns after
    the first one go out with it, in one batch; without a linger the first goes alone."""
    for linger, wanted in ((0.5, [["a", "b", "c"]]), (0.0, [["a"], ["b", "c"]])):
        sent: list[list[str]] = []

        async def flush(batch: dict[str, int], sent: list[list[str]] = sent) -> None:
            sent.append(list(batch))

        b: Batcher[str, int] = Batcher("test jobs", flush, operator.add, linger_s=linger)
        b.add("a", 1)
        for _ in range(3):  # a few turns of the loop: the batch task has started by then
            await asyncio.sleep(0)
        b.add("b", 1)
        b.add("c", 1)
        await b.idle()
        assert sent == wanted, linger
