"""gateway/coalesce.py: reads asked while one is in flight go out together, at most
`max_batch` a query (no I/O: the fetch is a function of the test)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.coalesce import Coalescer


async def test_reads_waiting_go_out_together_at_most_max_batch_a_query() -> None:
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def fetch(_: int, keys: list[int]) -> list[int]:
        batches.append(keys)
        await gate.wait()
        return [k * 10 for k in keys]

    c: Coalescer[int, int] = Coalescer(fetch, max_batch=3)
    first = c.ask(0, 0)
    await asyncio.sleep(0)  # the first query is in flight, held by the gate
    rest = [c.ask(0, k) for k in range(1, 8)]
    gate.set()
    assert await first == 0
    assert [await f for f in rest] == [k * 10 for k in range(1, 8)]
    assert batches == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert c.queries == 4 and c.reads == 8


async def test_without_max_batch_every_waiting_read_shares_one_query() -> None:
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def fetch(_: int, keys: list[int]) -> list[int]:
        batches.append(keys)
        await gate.wait()
        return keys

    c: Coalescer[int, int] = Coalescer(fetch)
    first = c.ask(0, 0)
    await asyncio.sleep(0)
    rest = [c.ask(0, k) for k in range(1, 8)]
    gate.set()
    await asyncio.gather(first, *rest)
    assert batches == [[0], list(range(1, 8))]


async def test_min_interval_gathers_reads_under_load_but_not_after_a_quiet_spell() -> None:
    """gateway/usercap.py counts connects with a minimum interval between queries: the
    first read goes at once; reads asked a few loop turns apart within the interval go
    out together, no sooner than the interval after the previous query started."""
    loop = asyncio.get_running_loop()
    for interval, wanted in ((0.3, [["a"], ["b", "c"]]), (0.0, [["a"], ["b"], ["c"]])):
        batches: list[list[str]] = []
        starts: list[float] = []

        async def fetch(
            _: int, keys: list[str], batches: Any = batches, starts: Any = starts
        ) -> list[str]:
            batches.append(list(keys))
            starts.append(loop.time())
            return keys

        c: Coalescer[str, str] = Coalescer(fetch, min_interval_s=interval)
        t0 = loop.time()
        assert await c.read(0, "a") == "a"
        assert starts[0] - t0 < 0.2  # the first read did not wait
        b = c.ask(0, "b")
        for _ in range(3):  # a few turns of the loop: b's query has started by then, if at all
            await asyncio.sleep(0)
        assert await asyncio.gather(b, c.ask(0, "c")) == ["b", "c"]
        assert batches == wanted, interval
        assert starts[1] - starts[0] >= interval * 0.9


async def test_a_lone_read_is_answered_by_its_query_task_alone() -> None:
    """A read with none of its shard in flight costs one task, the one running its query
    (returned as its future); reads asked in the same turn still join that query, and
    those asked while it is in flight go together after it."""
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def fetch(_: int, keys: list[int]) -> list[int]:
        batches.append(keys)
        await gate.wait()
        return [k + 1 for k in keys]

    c: Coalescer[int, int] = Coalescer(fetch)
    before = len(asyncio.all_tasks())
    lone = c.ask(0, 0)
    assert isinstance(lone, asyncio.Task) and len(asyncio.all_tasks()) == before + 1
    same_turn = c.ask(0, 1)
    await asyncio.sleep(0)  # the query is in flight, held by the gate
    later = [c.ask(0, k) for k in (2, 3)]
    gate.set()
    assert await asyncio.gather(lone, same_turn, *later) == [1, 2, 3, 4]
    assert batches == [[0, 1], [2, 3]] and c.queries == 2 and c.reads == 4


async def test_a_lone_read_cancelled_by_its_caller_leaves_the_reads_behind_it_answered() -> None:
    started = asyncio.Event()
    gate = asyncio.Event()

    async def fetch(_: int, keys: list[int]) -> list[int]:
        started.set()
        await gate.wait()
        return keys

    c: Coalescer[int, int] = Coalescer(fetch)
    lone = c.ask(0, 0)
    await started.wait()
    behind = c.ask(0, 1)
    lone.cancel()
    gate.set()
    assert await behind == 1
    assert lone.cancelled()
    # Nothing in flight any more: the next read is lone again.
    assert await c.ask(0, 2) == 2
