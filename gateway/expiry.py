"""Sessions end when their token does: at `exp` + the leeway the server closes with 4001,
unless the client has sent a newer token (`auth`) meanwhile.

One heap of deadlines per node and one task that sleeps until the earliest, instead of a
timer per connection. A refresh pushes the connection again with its new deadline; the
old entry is recognised as stale when it comes up (its deadline is no longer the
connection's). Entries of closed connections are dropped when they come up, or all at
once when they outnumber the live ones (a node with churn and day-long tokens must not
keep one entry per connection it ever had).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from typing import TYPE_CHECKING

from gateway.protocol.frames import CloseCode

if TYPE_CHECKING:
    from gateway.connection import Connection

log = logging.getLogger("agora.gateway")

MAX_SLEEP_S = 1.0  # also bounds how late a deadline pushed without a wake-up is noticed
COMPACT_MIN = 1024


class TokenExpiry:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Connection]] = []
        self._order = itertools.count()  # ties never compare connections
        self._wake: asyncio.Event | None = None
        self._compact_at = COMPACT_MIN
        self.closed = 0  # sessions closed at expiry (observed by tests and metrics)

    def watch(self, conn: Connection, deadline: float) -> None:
        """Close `conn` at `deadline` (wall-clock seconds) unless it gets a later one."""
        conn.token_deadline = deadline
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (deadline, next(self._order), conn))
        if len(self._heap) > self._compact_at:
            self._compact()
        if self._wake is not None and (earliest is None or deadline < earliest):
            self._wake.set()

    def _compact(self) -> None:
        # Amortised O(1) per push: the next compaction waits until the heap has doubled.
        self._heap = [e for e in self._heap if not e[2].is_gone and e[2].token_deadline == e[0]]
        heapq.heapify(self._heap)
        self._compact_at = max(COMPACT_MIN, 2 * len(self._heap))

    def expire(self, now: float) -> float | None:
        """Close every connection whose deadline has passed; the next deadline, if any."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, conn = heapq.heappop(heap)
            if conn.is_gone or conn.token_deadline != deadline:
                continue  # closed, or refreshed since
            self.closed += 1
            log.info("conn %d (%s): token expired, closing 4001", conn.id, conn.user)
            conn.close(CloseCode.UNAUTHORIZED, "token expired")
        return heap[0][0] if heap else None

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            nxt = self.expire(time.time())
            self._wake.clear()
            delay = MAX_SLEEP_S if nxt is None else min(MAX_SLEEP_S, max(0.0, nxt - time.time()))
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
