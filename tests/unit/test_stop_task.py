"""core.tasks.stop_task: a background task ends at shutdown even if it swallows a
cancellation (the gateway's lifespan waits on it before it can exit)."""

from __future__ import annotations

import asyncio
import time

from core.tasks import stop_task, stop_tasks
from tests.cancels import SwallowsOneCancel


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again() -> None:
    stubborn = SwallowsOneCancel()
    task = asyncio.create_task(stubborn.loop())
    await asyncio.sleep(0)
    started = time.monotonic()
    await asyncio.wait_for(stop_task(task, recancel_s=0.05), 5)
    assert task.cancelled() and stubborn.swallowed == 1
    assert time.monotonic() - started < 2


async def test_a_task_that_failed_or_ended_is_waited_for_quietly() -> None:
    async def fails() -> None:
        raise RuntimeError("already broken")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await stop_task(failed)  # its exception was the task's business (logged by it)
    await stop_task(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await stop_task(done)
    assert failed.done() and done.done()


async def test_several_tasks_are_all_cancelled_and_each_ended() -> None:
    stubborn = SwallowsOneCancel()
    tasks = [asyncio.create_task(stubborn.loop()), asyncio.create_task(asyncio.sleep(60))]
    await asyncio.sleep(0)
    try:
        await asyncio.wait_for(stop_tasks(tasks, recancel_s=0.05), 5)
        assert all(t.cancelled() for t in tasks) and stubborn.swallowed == 1
    finally:
        stubborn.swallowed = 1  # a failed test's stubborn task ends at its next cancellation
        for task in tasks:
            task.cancel()
