"""Server pings: every heartbeat interval each connection gets a WebSocket ping, and one
that has sent nothing for two intervals (no pong, no frame) is closed (docs/protocol.md).

One task per node rather than a timer per connection: 20,000 idle connections cost one
sweep per interval, done in slices so the event loop is never held for long.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from core.settings import Settings
from gateway.protocol.frames import CloseCode

if TYPE_CHECKING:
    from gateway.connection import Connection

log = logging.getLogger("agora.gateway")

SLICE = 500  # connections pinged between two yields to the event loop


def sweep(conns: list[Connection]) -> None:
    """One round over `conns`: ping the live, close the silent (pure: no waiting)."""
    for conn in conns:
        link = conn.link
        if conn.close_code is not None:
            continue
        link.idle += 1
        try:
            if link.idle > 2:  # silent since the ping before last: two intervals
                log.info("conn %d (%s): silent for two heartbeats, closing", conn.id, conn.user)
                conn.close(CloseCode.INTERNAL, "keepalive ping timeout")  # reconnect with backoff
            else:
                link.ping()
        except Exception:  # one broken socket must not stop the node's heartbeats
            log.exception("conn %d: heartbeat failed", conn.id)


async def keep_alive(connections: Collection[Connection], settings: Settings) -> None:
    interval = settings.heartbeat_ms / 1000
    while True:
        await asyncio.sleep(interval)
        conns = list(connections)
        for start in range(0, len(conns), SLICE):
            sweep(conns[start : start + SLICE])
            await asyncio.sleep(0)
