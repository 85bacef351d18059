"""Keeps a node's entries in the Redis route sets equal to its local subscribers.

Changes are batched: every subscribe, unsubscribe, connect and disconnect that happens
while one update is in flight goes out in the next, one pipelined round trip, so a
connection storm costs a few round trips rather than one per connection. What to add or
drop is decided at flush time from the node's local state, so an unsubscribe racing a
subscribe of the same conversation can never leave the route dropped while someone
listens. A subscriber waits (`ensure`) until its conversation is registered before reading
storage: a message persisted after that read is then always published to this node.

An update carries at most MAX_BATCH conversations and users (a mass disconnect drops
thousands: several bounded pipelines, one after the other, rather than one huge one that
holds a connection for long); a failed one is retried with a doubling backoff
(gateway/batches.py) and nothing in it is dropped: it stays dirty until an update succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import TypeVar

from core.errors import Unavailable
from fanout.routing import Routes
from gateway.batches import MAX_BATCH, Backoff

log = logging.getLogger("agora.gateway")
T = TypeVar("T")
MIN_INTERVAL_S = 0.002  # between the starts of two route updates


class RouteSync:
    def __init__(
        self,
        routes: Routes,
        node: str,
        has_conv: Callable[[int], bool],
        has_user: Callable[[str], bool],
    ) -> None:
        self.routes = routes
        self.node = node
        self.has_conv = has_conv
        self.has_user = has_user
        self._dirty_convs: set[int] = set()
        self._dirty_users: set[str] = set()
        self._convs: set[int] = set()  # registered in Redis, as far as we know
        self._users: set[str] = set()
        # (waiting, conversation, user): answered once what they wait for is registered.
        self._waiters: list[tuple[asyncio.Future[None], int | None, str | None]] = []
        self._wake = asyncio.Event()
        self.backoff = Backoff()
        self.max_batch = MAX_BATCH
        self.flushes = 0
        # An update starts at least this long after the previous one started: one after a
        # quiet spell goes at once; in a connection storm the changes gather for up to
        # this long, so the round trips (each ~20-30 us of Redis CPU, whatever its size)
        # stay few when Redis answers fast (bench/RESULTS.md, issue 14, "Connects").
        self.min_interval_s = MIN_INTERVAL_S

    def changed(self, convs: tuple[int, ...] = (), users: tuple[str, ...] = ()) -> None:
        self._dirty_convs.update(convs)
        self._dirty_users.update(users)
        if convs or users:
            self._wake.set()

    async def ensure(self, conv: int | None = None, user: str | None = None) -> None:
        """Return once `conv` / `user` is registered (raises Unavailable if Redis fails)."""
        conv_ok = conv is None or (conv in self._convs and conv not in self._dirty_convs)
        user_ok = user is None or (user in self._users and user not in self._dirty_users)
        if conv_ok and user_ok:
            return
        if conv is not None and conv not in self._convs:
            self._dirty_convs.add(conv)
        if user is not None and user not in self._users:
            self._dirty_users.add(user)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, conv, user))
        self._wake.set()
        await fut

    def forget_registered(self) -> None:
        """Redis lost our entries (restart, lapsed lease): the caller registers again."""
        self._convs.clear()
        self._users.clear()

    def mark_registered(self, convs: list[int], users: list[str]) -> None:
        self._convs.update(convs)
        self._users.update(users)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = -1e9
        while True:
            await self._wake.wait()
            wait = started + self.min_interval_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            started = loop.time()
            self._wake.clear()
            convs = _take(self._dirty_convs, self.max_batch)
            users = _take(self._dirty_users, self.max_batch - len(convs))
            add_c = [c for c in convs if self.has_conv(c)]
            drop_c = [c for c in convs if not self.has_conv(c)]
            add_u = [u for u in users if self.has_user(u)]
            drop_u = [u for u in users if not self.has_user(u)]
            try:
                await self.routes.update(self.node, add_c, drop_c, add_u, drop_u)
            except Exception as exc:
                self._dirty_convs |= convs
                self._dirty_users |= users
                delay = self.backoff.failed()
                if self.backoff.streak == 1 or delay >= self.backoff.max_s:
                    log.warning(
                        "node %s: route update failed (%s); retrying in %.2f s",
                        self.node,
                        exc,
                        delay,
                    )
                waiters, self._waiters = self._waiters, []
                for w, _, _ in waiters:
                    if not w.done():
                        w.set_exception(Unavailable(f"routing unavailable: {type(exc).__name__}"))
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            self.backoff.succeeded()
            self.flushes += 1
            self._convs.update(add_c)
            self._convs.difference_update(drop_c)
            self._users.update(add_u)
            self._users.difference_update(drop_u)
            # Those whose conversation or user is still dirty wait for a later update.
            waiting = []
            for w, conv, user in self._waiters:
                if w.done():
                    continue
                if conv in self._dirty_convs or user in self._dirty_users:
                    waiting.append((w, conv, user))
                else:
                    w.set_result(None)
            self._waiters = waiting
            if self._dirty_convs or self._dirty_users:
                self._wake.set()


def _take(items: set[T], limit: int) -> set[T]:
    """Up to `limit` of `items`, removed from it."""
    if len(items) <= limit:
        taken = set(items)
        items.clear()
        return taken
    taken = set(itertools.islice(items, max(0, limit)))
    items.difference_update(taken)
    return taken
