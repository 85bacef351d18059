"""A task that loses one cancellation, as redis-py 8.1's pipeline does with one that lands
as it starts (core/tasks.py): what the stop tests of core.tasks, the Batcher and the node
stop."""

from __future__ import annotations

import asyncio


class SwallowsOneCancel:
    """Sleeps that swallow the first cancellation of any of them (the sleep just returns,
    as a lost cancel looks) and end on every later one."""

    def __init__(self) -> None:
        self.swallowed = 0
        self.sleeping = asyncio.Event()  # set once a sleep has begun

    async def sleep(self, seconds: float = 60) -> None:
        self.sleeping.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1

    async def loop(self) -> None:
        """Sleeps for ever: a loop that goes on to its next turn after a lost cancel."""
        while True:
            await self.sleep()
