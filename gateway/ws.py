"""`GET /v1/ws`: admission, authentication, then the read loop of one connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

from gateway.auth import TokenVerifier, bearer
from gateway.connection import Connection
from gateway.node import Node
from gateway.protocol import codec as codecs
from gateway.protocol import frames
from gateway.protocol.frames import CloseCode, FrameError, ProtocolViolation, parse_request
from gateway.session import RequestHandler
from storage.errors import Unauthorized
from storage.settings import Settings

log = logging.getLogger("agora.gateway")


def _refuse(retry_after_s: float, why: str) -> PlainTextResponse:
    return PlainTextResponse(
        f"{why}; retry later\n",
        status_code=503,
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


async def websocket_endpoint(websocket: WebSocket) -> None:
    state = websocket.app.state
    settings: Settings = state.settings
    node: Node = state.node
    verifier: TokenVerifier = state.verifier
    handler: RequestHandler = state.handler

    # Admission control, before any upgrade work.
    if node.draining or len(node.connections) >= settings.max_connections:
        state.metrics["refused"] += 1
        await websocket.send_denial_response(_refuse(1, "node at capacity"))
        return

    offered = websocket.scope.get("subprotocols") or []
    codec, echoed = codecs.choose(list(offered))
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    try:
        identity = verifier.verify(token)
    except Unauthorized as exc:
        await websocket.accept(subprotocol=echoed)
        await websocket.close(CloseCode.UNAUTHORIZED, exc.message[:120])
        return

    await websocket.accept(subprotocol=echoed)
    conn = Connection(
        websocket, codec, identity.user, settings.outbound_max_frames, settings.outbound_max_bytes
    )
    writer = asyncio.create_task(conn.writer())
    try:
        await node.attach(conn)
    except Exception:
        log.exception("attach failed")
        conn.close(CloseCode.TRY_AGAIN_LATER, "routing unavailable")
        await conn.closed.wait()
        return
    conn.push_frame(
        frames.hello(identity.user, node.id, settings.heartbeat_ms, settings.max_frame_bytes)
    )
    conn.reader = asyncio.current_task()
    try:
        await _read_loop(websocket, conn, handler)
    except asyncio.CancelledError:
        if conn.close_code is None:
            raise  # not our own close: a real cancellation (shutdown)
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    finally:
        await node.detach(conn)
        if conn.close_code is None:
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(writer, 5)


async def _read_loop(websocket: WebSocket, conn: Connection, handler: RequestHandler) -> None:
    receive = websocket.receive
    while conn.close_code is None:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        try:
            req = parse_request(conn.codec.decode(data))
        except ProtocolViolation as exc:
            conn.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
            await conn.closed.wait()
            return
        except FrameError as exc:
            conn.push_frame(frames.err(exc.rid, exc.error))
            continue
        await handler.handle(conn, req)
    await conn.closed.wait()
