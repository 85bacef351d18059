"""One client connection: its subscriptions and its bounded outbound queue.

Frames are queued, not written inline, so a delivery to ten thousand connections never
waits on one socket. A writer task drains the queue; the socket's own flow control pauses
it. A connection whose queue passes the frame or byte limit is a slow consumer: it is
closed with 4009 instead of being allowed to grow memory or stall the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from typing import Any

from starlette.websockets import WebSocket

from gateway.protocol.codec import Codec
from gateway.protocol.frames import CloseCode
from gateway.protocol.subscription import Subscription

log = logging.getLogger("agora.gateway")
_ids = itertools.count(1)
# How long the close frame may wait behind unread data: a reader that resumes within this
# still learns why it was closed (4009); one that never reads is cut off after it.
CLOSE_TIMEOUT_S = 10.0


class Connection:
    def __init__(
        self, websocket: WebSocket, codec: Codec, user: str, max_frames: int, max_bytes: int
    ) -> None:
        self.id = next(_ids)
        self.websocket = websocket
        self.codec = codec
        self.user = user
        self.subs: dict[int, Subscription] = {}
        self._queue: deque[bytes | str] = deque()
        self._queued_bytes = 0
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._wake = asyncio.Event()
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.sent_frames = 0
        self.reader: asyncio.Task[object] | None = None  # cancelled once we have closed
        self.writer_task: asyncio.Task[None]
        self.frames_in = 0
        self.busy = False  # a request is being handled: a drain closes after its reply
        self.pending_close: int | None = None
        self.requests: deque[Any] = deque()  # parsed requests waiting to be handled
        self.handler_task: asyncio.Task[None] | None = None

    # -- outbound ---------------------------------------------------------------------------
    def push(self, data: bytes | str) -> None:
        """Queue an encoded frame; a full queue closes the connection with 4009."""
        if self.close_code is not None:
            return
        size = len(data)
        if len(self._queue) >= self._max_frames or self._queued_bytes + size > self._max_bytes:
            log.info("conn %d (%s): slow consumer, closing 4009", self.id, self.user)
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        self._queue.append(data)
        self._queued_bytes += size
        self._wake.set()

    def push_frame(self, frame: dict[str, Any]) -> None:
        self.push(self.codec.encode(frame))

    def close_when_idle(self, code: int) -> None:
        """Close now, or right after the request in flight has been answered."""
        if self.busy:
            self.pending_close = code
        else:
            self.close(code, "server shutting down")

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is queued (the writer sends the close frame last)."""
        if self.close_code is None:
            self.close_code = code
            self._close_reason = reason
            if code == CloseCode.SLOW_CONSUMER:
                self._queue.clear()  # it cannot read them anyway; free the memory now
                self._queued_bytes = 0
            self._wake.set()
            # Stop reading and leave the node now: no more deliveries are queued for a
            # connection that is closing, however long its close frame takes to go out.
            if self.reader is not None and self.reader is not asyncio.current_task():
                self.reader.cancel()

    async def writer(self) -> None:
        send = self.websocket.send
        binary = self.codec.binary
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    data = self._queue.popleft()
                    self._queued_bytes -= len(data)
                    if binary:
                        await send({"type": "websocket.send", "bytes": data})
                    else:
                        await send({"type": "websocket.send", "text": data})
                    self.sent_frames += 1
                if self.close_code is not None:
                    break
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    send(
                        {
                            "type": "websocket.close",
                            "code": self.close_code,
                            "reason": self._close_reason,
                        }
                    ),
                    CLOSE_TIMEOUT_S,
                )
        except Exception:  # the peer is gone; the reader notices and cleans up
            pass
        finally:
            self.closed.set()
            if self.close_code is not None and self.reader is not None:
                # We closed: stop waiting for frames from a peer that may never send again.
                self.reader.cancel()

    @property
    def queued(self) -> tuple[int, int]:
        return len(self._queue), self._queued_bytes
