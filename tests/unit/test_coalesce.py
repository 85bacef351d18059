"""gateway/coalesce.py: reads asked while one is in flight go out together, at most
`max_batch` a query (no I/O: the fetch is a function of the test)."""

from __future__ import annotations

import asyncio

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
