"""Stopping background tasks for good.

A single `task.cancel(); await task` can wait forever: a cancellation can be lost on the
way (redis-py 8.1's pipeline swallows one that lands as it starts; Python 3.11's wait_for
loses one that races with its inner future's completion), and a task that loops then goes
on to its next turn, awaited by a shutdown that never returns (a gateway that would not
exit on SIGTERM; tests/integration/test_node_stop.py). Here a task is cancelled again
every `recancel_s` until it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None, recancel_s: float = 1.0) -> None:
    """Cancel a task and wait for its end, cancelling it again every `recancel_s` while it
    runs on. Its result or failure is retrieved, not raised (a task's own failure is its
    business: it logged it)."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=recancel_s)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], recancel_s: float = 1.0) -> None:
    """`stop_task` for several: all cancelled at once, then each waited for in turn."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        await stop_task(task, recancel_s)
