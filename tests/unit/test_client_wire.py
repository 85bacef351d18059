"""agora_client over a real WebSocket against a scripted peer on loopback (no engines):
hello, a request and its reply, and the close code reaching the caller, in both encodings.
Run at the declared floors too (scripts/lowest-test): this is where a websockets release
without what the client uses (`close_code`, `close_reason`) shows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from agora_client import AgoraClient, Closed

HELLO = {"t": "hello", "user": "alice", "node": "peer", "hb": 25000, "max_frame": 65536}
Script = Callable[[ServerConnection, Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


async def run_peer(script: Script, client_side: Callable[[str], Awaitable[None]]) -> None:
    async def handler(ws: ServerConnection) -> None:
        binary = ws.subprotocol == "chat.v1.msgpack"

        async def send(frame: dict[str, Any]) -> None:
            await ws.send(msgpack.packb(frame) if binary else orjson.dumps(frame).decode())

        await script(ws, send)

    async with serve(
        handler,
        "127.0.0.1",
        0,
        subprotocols=["chat.v1.json", "chat.v1.msgpack"],  # type: ignore[list-item]  # Subprotocol is a NewType
    ) as server:
        port = server.sockets[0].getsockname()[1]
        await asyncio.wait_for(client_side(f"ws://127.0.0.1:{port}/v1/ws"), 10)


def decode(data: str | bytes) -> dict[str, Any]:
    out: dict[str, Any] = msgpack.unpackb(data) if isinstance(data, bytes) else orjson.loads(data)
    return out


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_request_reply_then_the_close_code(encoding: str) -> None:
    async def peer(ws: ServerConnection, send: Any) -> None:
        assert ws.request is not None
        assert ws.request.headers["Authorization"] == "Bearer tok"
        await send(HELLO)
        raw = [await ws.recv(), await ws.recv()]
        # Binary frames exactly when msgpack was negotiated.
        assert {isinstance(data, bytes) for data in raw} == {encoding == "msgpack"}
        got = {f["t"]: f for f in map(decode, raw)}
        assert got["typing"] == {"t": "typing", "conv": "1"}
        await send({"t": "pong", "rid": got["ping"]["rid"]})
        await ws.close(4009, "slow consumer")

    async def client(url: str) -> None:
        c = await AgoraClient.connect(url, "tok", encoding)
        assert c.hello == HELLO
        ping = asyncio.ensure_future(c.request({"t": "ping"}))
        await c.ws.send(c.encode({"t": "typing", "conv": "1"}))
        assert (await ping)["t"] == "pong"
        await asyncio.wait_for(c.closed.wait(), 5)
        assert c.close_code == 4009

    await run_peer(peer, client)


async def test_a_close_before_hello_is_reported_with_its_code_and_reason() -> None:
    async def peer(ws: ServerConnection, send: Any) -> None:
        await ws.close(4001, "token expired")

    async def client(url: str) -> None:
        with pytest.raises(Closed) as closed:
            await AgoraClient.connect(url, "tok", "json", timeout=5)
        assert (closed.value.code, closed.value.reason) == (4001, "token expired")

    await run_peer(peer, client)
