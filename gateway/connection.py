"""One client connection (a session, in Centrifuge's terms): who it is, what it follows,
the requests it has waiting, and how its outbound frames leave.

Frames are written straight to the socket's transport, in the order they are pushed, with
no task or queue of our own: a delivery to ten thousand connections is ten thousand
`write` calls of the same bytes. uvloop's transport sends at once when nothing is waiting
in its buffer, so every write is a `send()` system call (on loopback it also carries the
receiver's TCP processing); the node therefore joins a conversation's messages that it
dispatches together into one write per socket (gateway.node). What a socket cannot take
yet waits in its transport's buffer. Once that buffer is past its high-water mark (the
transport paused us), every further frame is counted; a connection that reaches the
frame or byte limit that way is a slow consumer and is closed with 4009 instead of being
allowed to grow memory or stall the node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from gateway.protocol.codec import Codec
from gateway.protocol.frames import CloseCode
from gateway.protocol.subscription import Subscription

log = logging.getLogger("agora.gateway")
_ids = itertools.count(1)
CLOSED_BY_PEER = 1006  # RFC 6455's "closed abnormally"; never sent, marks a peer's close


class Link(Protocol):
    """The connection's socket, as the transport (gateway.transport) presents it."""

    paused: bool  # the socket's buffer is past its high-water mark
    idle: int  # heartbeat rounds since the peer last sent anything

    def write(self, data: bytes) -> None: ...

    def ping(self) -> None: ...

    def buffered(self) -> int: ...

    def send_close(self, code: int, reason: str) -> None: ...


class WireCounters:
    """Frames and bytes that crossed the sockets of one encoding (read by /metrics)."""

    __slots__ = ("bytes_in", "bytes_out", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.frames_in = self.bytes_in = self.frames_out = self.bytes_out = 0


class Connection:
    __slots__ = (
        "_gone",
        "_greeting",
        "_max_bytes",
        "_max_frames",
        "_on_close",
        "_paused_frames",
        "busy",
        "close_code",
        "close_reason",
        "codec",
        "direct",
        "flight",
        "handler_task",
        "id",
        "limits",
        "link",
        "pending_close",
        "requests",
        "subs",
        "token_deadline",
        "turn",
        "user",
        "wake",
        "wire",
    )

    def __init__(
        self,
        link: Link,
        codec: Codec,
        user: str,
        max_frames: int,
        max_bytes: int,
        wire: WireCounters | None = None,
    ) -> None:
        self.id = next(_ids)
        self.link = link
        self.codec = codec
        self.user = user
        self.wire = wire if wire is not None else WireCounters()
        self.subs: dict[int, Subscription] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self.busy = False  # requests are being handled: a drain closes after their replies
        self.pending_close: int | None = None
        self.requests: deque[Any] = deque()  # parsed requests waiting to be handled
        self.handler_task: asyncio.Task[None] | None = None
        # Pipelined sends being handled, by cid (gateway/ws.py), the last one's produce
        # turn (gateway/sendorder.py), and what wakes the handler when a request arrives
        # while it waits for them.
        self.flight: dict[str, asyncio.Task[None]] = {}
        self.turn: Any = None
        self.wake: asyncio.Future[None] | None = None
        self.limits: Any = None  # the read side's per-connection rate limits (gateway.ws)
        # Wall-clock second at which the session's token runs out (gateway.expiry).
        self.token_deadline = float("inf")
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._paused_frames = 0
        self._gone = False
        self._on_close: list[Callable[[Connection], object]] = []
        # Until `greet` runs: hello, then whatever was pushed meanwhile (see `hold_greeting`).
        self._greeting: list[bytes] | None = None
        # Frames go straight to the socket (greeted, not closed): what the node's delivery
        # loop checks before writing to `link` itself instead of calling `push`.
        self.direct = True

    # -- outbound ---------------------------------------------------------------------------
    def push(self, data: bytes) -> None:
        """Write one complete WebSocket frame (see Codec.frame); a connection that lets its
        frames pile up past the limits is closed with 4009 instead."""
        if self.close_code is not None:
            return
        if self._greeting is not None:
            self._greeting.append(data)
            return
        link = self.link
        if link.paused:
            self._paused_frames += 1
            if (
                self._paused_frames > self._max_frames
                or link.buffered() + len(data) > self._max_bytes
            ):
                log.info("conn %d (%s): slow consumer, closing 4009", self.id, self.user)
                self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
                return
        link.write(data)
        wire = self.wire
        wire.frames_out += 1
        wire.bytes_out += len(data)

    def push_frame(self, frame: dict[str, Any]) -> None:
        self.push(self.codec.frame(frame))

    def hold_greeting(self, hello: dict[str, Any]) -> None:
        """Keep `hello` and every frame pushed after it until `greet`. The node registers
        a connection (its user's routes) after accepting it; hello goes out only once that
        is done, so a client that has its hello gets every user frame sent after it
        (`joined`, `notify`), and hello stays the first frame."""
        self._greeting = [self.codec.frame(hello)]
        self.direct = False

    def greet(self) -> None:
        """Write hello and the frames held behind it, in order."""
        held, self._greeting = self._greeting, None
        for data in held or ():
            self.push(data)
        self.direct = self.close_code is None

    def resumed(self) -> None:
        """The socket drained below its low-water mark: count afresh."""
        self._paused_frames = 0

    def close_when_idle(self, code: int) -> None:
        """Close now, or right after the requests in flight have been answered."""
        if self.busy:
            self.pending_close = code
        else:
            self.close(code, "server shutting down")

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is already written (the close frame goes out last)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.direct = False
            self.link.send_close(code, reason)
            self.gone()

    # -- lifecycle --------------------------------------------------------------------------
    def lost(self) -> None:
        """The peer closed or went away: nobody waits for replies to its requests."""
        if self.close_code is None:
            self.close_code = CLOSED_BY_PEER
            self.direct = False
            if self.handler_task is not None:
                self.handler_task.cancel()
        self.gone()

    def on_close(self, callback: Callable[[Connection], object]) -> None:
        """Call `callback(conn)` once, when the connection closes (either side); at once
        if it has closed already (its callbacks ran: one added after them never would,
        as a session count's release added once the count came back, the peer gone
        meanwhile)."""
        if self._gone:
            callback(self)
            return
        self._on_close.append(callback)

    def gone(self) -> None:
        """The connection is over for the node (we closed it, or the peer went away)."""
        if self._gone:
            return
        self._gone = True
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback(self)

    @property
    def is_gone(self) -> bool:
        return self._gone
