"""`GET /v1/ws`: admission, authentication, then the read loop of one connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

from gateway.admission import Admission, Refusal
from gateway.auth import TokenVerifier, bearer
from gateway.connection import CLOSE_TIMEOUT_S, Connection
from gateway.limits import AbusePolicy, TokenBucket
from gateway.node import Node
from gateway.protocol import codec as codecs
from gateway.protocol import frames
from gateway.protocol.frames import CloseCode, FrameError, ProtocolViolation, parse_request
from gateway.session import RequestHandler
from storage import logs
from storage.errors import RateLimited, Unauthorized, Unavailable
from storage.settings import Settings

log = logging.getLogger("agora.gateway")


def _refusal_response(refusal: Refusal) -> PlainTextResponse:
    return PlainTextResponse(
        f"{refusal.reason}; retry later\n",
        status_code=refusal.status,
        headers={"Retry-After": str(refusal.retry_after_s)},
    )


async def websocket_endpoint(websocket: WebSocket) -> None:
    state = websocket.app.state
    settings: Settings = state.settings
    node: Node = state.node
    admission: Admission = state.admission

    ip = websocket.client.host if websocket.client else "?"
    refusal = admission.check(len(node.connections), node.draining, ip)
    if refusal is not None:
        await websocket.send_denial_response(_refusal_response(refusal))
        return
    admission.handshakes += 1
    try:
        conn = await _open(websocket, state.verifier, node, settings)
    finally:
        admission.handshakes -= 1
    if conn is None:
        return
    conn.reader = asyncio.current_task()
    try:
        await _read_loop(conn, state.handler, settings)
    except asyncio.CancelledError:
        if conn.close_code is None:
            raise  # not our own close: a real cancellation (shutdown)
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    finally:
        await node.detach(conn)
        if conn.close_code is None:
            conn.writer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(conn.writer_task, CLOSE_TIMEOUT_S + 1)


async def _open(
    websocket: WebSocket, verifier: TokenVerifier, node: Node, settings: Settings
) -> Connection | None:
    """Authenticate, accept, register; None when the connection was closed instead."""
    offered = websocket.scope.get("subprotocols") or []
    codec, echoed = codecs.choose(list(offered))
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    try:
        identity = verifier.verify(token)
    except Unauthorized as exc:
        # Accept first: a browser cannot read an HTTP refusal, but it sees a close code.
        await websocket.accept(subprotocol=echoed)
        await websocket.close(CloseCode.UNAUTHORIZED, exc.message[:120])
        return None
    await websocket.accept(subprotocol=echoed)
    conn = Connection(
        websocket, codec, identity.user, settings.outbound_max_frames, settings.outbound_max_bytes
    )
    logs.bind_connection(conn.id)  # log lines of this connection carry its id
    conn.writer_task = asyncio.create_task(conn.writer())
    try:
        await node.attach(conn)
    except Exception as exc:
        log.warning("conn %d: routing registration failed: %s", conn.id, exc)
        await node.detach(conn)
        conn.close(CloseCode.TRY_AGAIN_LATER, "routing unavailable")
        await conn.closed.wait()
        return None
    conn.push_frame(
        frames.hello(identity.user, node.id, settings.heartbeat_ms, settings.max_frame_bytes)
    )
    return conn


# Requests a connection may have waiting behind the one being handled. Reading never waits
# for handling: the server keeps reading (and so sees the client's pongs) while a pipelining
# client's sends queue up; past this many, further requests are refused, not buffered.
MAX_PENDING_REQUESTS = 256


async def _read_loop(conn: Connection, handler: RequestHandler, settings: Settings) -> None:
    receive = conn.websocket.receive
    decode = conn.codec.decode
    bucket = TokenBucket(settings.frames_per_s, 2 * settings.frames_per_s)
    abuse = AbusePolicy()
    try:
        while conn.close_code is None:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            conn.frames_in += 1
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                req = parse_request(decode(data))
            except ProtocolViolation as exc:
                conn.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
                break
            except FrameError as exc:
                conn.push_frame(frames.err(exc.rid, exc.error))
                continue
            wait_ms = bucket.take(time.monotonic())
            if wait_ms:
                if abuse.refused(time.monotonic()):
                    conn.close(CloseCode.RATE_LIMITED, "too many frames")
                    break
                conn.push_frame(
                    frames.err(req.rid, RateLimited("too many frames", retry_after_ms=wait_ms))
                )
                continue
            if conn.pending_close is not None:
                conn.push_frame(frames.err(req.rid, Unavailable("server shutting down")))
            elif len(conn.requests) >= MAX_PENDING_REQUESTS:
                conn.push_frame(
                    frames.err(
                        req.rid, RateLimited("too many requests in flight", retry_after_ms=100)
                    )
                )
            else:
                conn.requests.append(req)
                if conn.handler_task is None:
                    conn.handler_task = asyncio.create_task(_handle_requests(conn, handler))
        await conn.closed.wait()
    finally:
        if conn.handler_task is not None and conn.close_code is None:
            conn.handler_task.cancel()  # the client went away: nobody waits for the replies


async def _handle_requests(conn: Connection, handler: RequestHandler) -> None:
    """Handle a connection's requests one at a time, in order (a client's sends reach Kafka
    in the order it made them); exists only while there are requests."""
    try:
        while conn.requests and conn.close_code is None and conn.pending_close is None:
            conn.busy = True
            try:
                await handler.handle(conn, conn.requests.popleft())
            finally:
                conn.busy = False
        if conn.pending_close is not None and conn.close_code is None:
            conn.requests.clear()  # never accepted: the client retries them elsewhere
            conn.close(conn.pending_close, "server shutting down")  # after the reply
    finally:
        conn.handler_task = None
