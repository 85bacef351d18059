"""An asyncio WebSocket client of docs/protocol.md: one connection.

Replies are matched to requests by `rid`; everything else the server pushes (`msg`,
`typing`, `score`, `reconnect`, ...) lands in `events`, in arrival order. An `on_frame`
callback sees every frame first, in order, before any reply resolves its request: the
reconnecting client (agora_client.resilient) keeps its per-conversation seq there, so a
`subbed` reply is never processed before the replayed messages that preceded it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
from websockets.asyncio.client import ClientConnection, connect

SUBPROTOCOLS = {"json": "chat.v1.json", "msgpack": "chat.v1.msgpack"}


class ServerError(Exception):
    """The server answered a request with `err`."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('msg')}")
        self.code: str = frame.get("code", "")
        self.frame = frame


class Closed(ConnectionError):
    """The server closed the connection before `hello` (4001 for a bad token, 1013, ...)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed with {code} {reason}".strip())
        self.code = code
        self.reason = reason


FrameHook = Callable[[dict[str, Any]], bool]


class AgoraClient:
    def __init__(
        self, ws: ClientConnection, encoding: str, on_frame: FrameHook | None = None
    ) -> None:
        self.ws = ws
        self.encoding = encoding
        self.on_frame = on_frame  # returns True when it consumed the frame
        self.hello: dict[str, Any] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._rids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None,
        encoding: str = "json",
        *,
        use_header: bool = True,
        timeout: float = 10,
        on_frame: FrameHook | None = None,
        **kwargs: Any,
    ) -> AgoraClient:
        """Open a connection and wait for `hello`. Raises `Closed` when the server closes
        first, websockets' InvalidStatus on an HTTP refusal (503/429 + Retry-After)."""
        headers = {}
        if token and use_header:
            headers["Authorization"] = f"Bearer {token}"
        elif token:
            url = f"{url}{'&' if '?' in url else '?'}token={token}"
        ws = await connect(
            url,
            subprotocols=[SUBPROTOCOLS[encoding]],  # type: ignore[list-item]
            additional_headers=headers,
            open_timeout=timeout,
            compression=None,
            max_size=2**24,
            **kwargs,
        )
        client = cls(ws, encoding, on_frame)
        client._reader = asyncio.create_task(client._read())
        first_event = asyncio.ensure_future(client.events.get())
        closed = asyncio.ensure_future(client.closed.wait())
        try:
            done, _ = await asyncio.wait(
                {first_event, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
            if not first_event.done():
                first_event.cancel()
        if first_event not in done:
            await client.close()
            if client.closed.is_set():
                raise Closed(client.close_code, ws.close_reason or "")
            raise TimeoutError(f"no hello within {timeout}s")
        first = first_event.result()
        if first.get("t") != "hello":
            await client.close()
            raise RuntimeError(f"expected hello, got {first}")
        client.hello = first
        return client

    def encode(self, frame: dict[str, Any]) -> bytes | str:
        if self.encoding == "msgpack":
            out: bytes = msgpack.packb(frame)
            return out
        return orjson.dumps(frame).decode()

    def decode(self, data: bytes | str) -> dict[str, Any]:
        if isinstance(data, bytes):
            obj: dict[str, Any] = msgpack.unpackb(data, raw=False)
            return obj
        parsed: dict[str, Any] = orjson.loads(data)
        return parsed

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                frame = self.decode(data)
                if self.on_frame is not None and self.on_frame(frame):
                    continue
                rid = frame.get("rid")
                fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
                if fut is not None and frame.get("t") in ("ok", "pong", "ack", "subbed", "err"):
                    if not fut.done():
                        fut.set_result(frame)
                else:
                    await self.events.put(frame)
        except Exception:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"closed ({self.close_code})"))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def request(self, frame: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        rid = next(self._rids)
        frame = {**frame, "rid": rid}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self.ws.send(self.encode(frame))
        reply = await asyncio.wait_for(fut, timeout)
        if reply.get("t") == "err":
            raise ServerError(reply)
        return reply

    async def sub(self, conv: str, since: int | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "sub", "conv": conv}
        if since is not None:
            frame["since"] = since
        return await self.request(frame)

    async def unsub(self, conv: str) -> dict[str, Any]:
        return await self.request({"t": "unsub", "conv": conv})

    async def send(
        self,
        conv: str,
        body: str,
        cid: str | None = None,
        kind: str | None = None,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "t": "send",
            "conv": conv,
            "cid": cid or uuid.uuid4().hex,
            "body": body,
        }
        if kind:
            frame["kind"] = kind
        if reply_to is not None:
            frame["reply_to"] = reply_to
        return await self.request(frame)

    async def edit(self, conv: str, ref: str, body: str, cid: str | None = None) -> dict[str, Any]:
        """Edit one's own message `ref`: an `edit` event with its own seq."""
        frame = {"t": "edit", "conv": conv, "ref": ref, "body": body}
        return await self.request({**frame, "cid": cid or uuid.uuid4().hex})

    async def delete(self, conv: str, ref: str, cid: str | None = None) -> dict[str, Any]:
        """Delete one's own message `ref` (a tombstone stays)."""
        frame = {"t": "delete", "conv": conv, "ref": ref}
        return await self.request({**frame, "cid": cid or uuid.uuid4().hex})

    async def react(
        self, conv: str, ref: str, emoji: str, remove: bool = False, cid: str | None = None
    ) -> dict[str, Any]:
        """Add (or take back) one's reaction `emoji` to message `ref`."""
        frame = {"t": "react", "conv": conv, "ref": ref, "emoji": emoji, "remove": remove}
        return await self.request({**frame, "cid": cid or uuid.uuid4().hex})

    async def read(self, conv: str, seq: int) -> dict[str, Any]:
        """Move one's read pointer in `conv` to `seq` (forward only)."""
        return await self.request({"t": "read", "conv": conv, "seq": seq})

    async def typing(self, conv: str) -> None:
        await self.ws.send(self.encode({"t": "typing", "conv": conv}))

    async def ping(self) -> dict[str, Any]:
        return await self.request({"t": "ping"})

    async def next_event(self, t: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next pushed frame (of type `t`, skipping others)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {t or 'event'} within {timeout}s")
            frame = await asyncio.wait_for(self.events.get(), remaining)
            if t is None or frame.get("t") == t:
                return frame

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
