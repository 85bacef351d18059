"""Catching a node's subscribers up from storage when its pub/sub may have missed messages.

While a node's pub/sub connection is down (Redis restarted, the connection killed or cut),
what the fan-out workers publish to the node reaches nobody. A message lost in the middle
of a conversation shows as a gap when the next one arrives (gateway.node fills it); the
last messages before a quiet spell (the tail) have no next one. So after every resubscribe,
and every PERIODIC_S as a backstop, the node reads the last seq of every conversation it
has local subscribers of (one query per physical shard for all of them) and fills, from
storage, what each subscriber lacks.

Against live delivery: a resubscribe's check runs after the node's routes are registered
again, so a message persisted after the check's read is published to this node and one
persisted before it is in storage; a message that comes both ways is dropped the second
time by its subscription (its seq is not above the subscription's last). Subscriptions
still recovering (their `sub` is reading storage now) are left to that read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.connection import Connection
from gateway.protocol.subscription import State, Subscription
from storage import messages
from storage.models import Message
from storage.pools import ShardPools

log = logging.getLogger("agora.gateway")
PERIODIC_S = 30.0
# A periodic check only fills what is still missing this long after its read: a message
# persisted a moment ago is normally on its way through pub/sub, not lost.
SETTLE_S = 1.0
RETRY_S = 0.5
MAX_ATTEMPTS = 10
CHUNK = 1000  # messages read per query while catching a conversation up
MAX_ROUNDS = 20  # queries per conversation per check; the next check goes on


class TailCheck:
    def __init__(
        self,
        pools: ShardPools,
        conv_subs: dict[int, set[Connection]],
        push: Callable[[Connection, list[Message]], None],
        periodic_s: float = PERIODIC_S,
    ) -> None:
        self.pools = pools
        self.conv_subs = conv_subs  # the node's own map, read at each check
        self.push = push
        self.periodic_s = periodic_s
        self._wake = asyncio.Event()
        self.checks = 0
        self.filled = 0  # messages delivered by checks

    def request(self) -> None:
        """Check soon (the node's pub/sub connection was just re-established)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.periodic_s)
                settle = 0.0
            except TimeoutError:
                settle = SETTLE_S
            self._wake.clear()
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    await self.check(settle)
                    break
                except Exception as exc:  # a shard down: try again, then wait for the next
                    log.warning("tail check failed (attempt %d): %s", attempt, exc)
                    await asyncio.sleep(RETRY_S * attempt)

    async def check(self, settle_s: float = 0.0) -> int:
        """Fill every local subscription that is behind its conversation's last seq;
        returns how many messages that delivered."""
        self.checks += 1
        convs = [conv for conv, conns in self.conv_subs.items() if conns]
        if not convs:
            return 0
        latest = await messages.latest_seqs(self.pools, convs)
        if settle_s:
            await asyncio.sleep(settle_s)
        filled = 0
        for conv, last in latest.items():
            for _ in range(MAX_ROUNDS):
                behind = self._behind(conv, last)
                if not behind:
                    break
                low = min(sub.last_seq for _, sub in behind)
                missed = await messages.after(self.pools, conv, low, CHUNK)
                complete = len(missed) < CHUNK  # everything up to the last seq was read
                for conn, sub in self._behind(conv, last):  # again: time passed
                    out = sub.fill(missed)
                    if complete and sub.last_seq < last:
                        # Not in storage either (rows removed): accept the jump rather
                        # than read again forever, as a gap fill does.
                        out += sub.skip_to(last)
                    self.push(conn, out)
                    filled += len(out)
                if complete:
                    break
        if filled:
            log.info("tail check delivered %d missed messages", filled)
        self.filled += filled
        return filled

    def _behind(self, conv: int, last: int) -> list[tuple[Connection, Subscription]]:
        return [
            (conn, sub)
            for conn in list(self.conv_subs.get(conv, ()))
            if (sub := conn.subs.get(conv)) is not None
            and sub.state is not State.RECOVERING
            and sub.last_seq < last
        ]
