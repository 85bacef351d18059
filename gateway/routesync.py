"""Keeps a node's entries in the Redis route sets equal to its local subscribers.

Changes are batched: every subscribe, unsubscribe, connect and disconnect that happens
while one update is in flight goes out in the next, one pipelined round trip, so a
connection storm costs a few round trips rather than one per connection. What to add or
drop is decided at flush time from the node's local state, so an unsubscribe racing a
subscribe of the same conversation can never leave the route dropped while someone
listens. A subscriber waits (`ensure`) until its conversation is registered before reading
storage: a message persisted after that read is then always published to this node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from core.errors import Unavailable
from fanout.routing import Routes

log = logging.getLogger("agora.gateway")
RETRY_S = 0.5


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
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self.flushes = 0

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
        self._waiters.append(fut)
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
        while True:
            await self._wake.wait()
            self._wake.clear()
            convs, self._dirty_convs = self._dirty_convs, set()
            users, self._dirty_users = self._dirty_users, set()
            waiters, self._waiters = self._waiters, []
            add_c = [c for c in convs if self.has_conv(c)]
            drop_c = [c for c in convs if not self.has_conv(c)]
            add_u = [u for u in users if self.has_user(u)]
            drop_u = [u for u in users if not self.has_user(u)]
            try:
                await self.routes.update(self.node, add_c, drop_c, add_u, drop_u)
            except Exception as exc:
                log.warning("node %s: route update failed (%s); retrying", self.node, exc)
                self._dirty_convs |= convs
                self._dirty_users |= users
                for w in waiters:
                    if not w.done():
                        w.set_exception(Unavailable(f"routing unavailable: {type(exc).__name__}"))
                await asyncio.sleep(RETRY_S)
                self._wake.set()
                continue
            self.flushes += 1
            self._convs.update(add_c)
            self._convs.difference_update(drop_c)
            self._users.update(add_u)
            self._users.difference_update(drop_u)
            for w in waiters:
                if not w.done():
                    w.set_result(None)
