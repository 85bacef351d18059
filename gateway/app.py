"""The gateway's composition root: `create_app(settings)` builds every client and pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from fanout.kafka import ensure_topics, make_producer, messages_topic, wait_for_broker
from gateway.access import Access
from gateway.auth import TokenVerifier
from gateway.http import conversations, health
from gateway.http.common import JSONResponse, error_response, identity
from gateway.node import Node, make_node_id
from gateway.send import SendPath
from gateway.session import RequestHandler
from gateway.ws import websocket_endpoint
from storage import users
from storage.errors import AgoraError, Internal
from storage.ids import IdGenerator
from storage.pools import ShardPools
from storage.settings import Settings

log = logging.getLogger("agora.gateway")


async def me(request: Request) -> Response:
    who = identity(request)
    with contextlib.suppress(AgoraError):
        await users.ensure_user(request.app.state.pools, who.user, who.name)
    return JSONResponse({"id": who.user, "name": who.name})


async def _agora_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AgoraError)
    return error_response(exc)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "bad_request",
    409: "conflict",
    413: "too_large",
    429: "rate_limited",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "internal")
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(Internal("internal error"))


def create_app(settings: Settings) -> Starlette:
    verifier = TokenVerifier(settings)  # fails fast on missing keys

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        pools = ShardPools(settings)
        redis = aioredis.Redis.from_url(settings.redis_url)
        await wait_for_broker(settings)
        await ensure_topics(settings)
        producer = make_producer(settings)
        await producer.start()
        node = Node(settings, make_node_id(settings), redis, pools)
        access = Access(pools)
        send_path = SendPath(redis, node.keys, producer, messages_topic(settings), access)
        state.settings = settings
        state.verifier = verifier
        state.pools = pools
        state.redis = redis
        state.ids = IdGenerator()
        state.node = node
        state.access = access
        state.send_path = send_path
        state.handler = RequestHandler(node, access, send_path)
        state.metrics = Counter()
        await node.start()
        log.info("gateway node %s ready", node.id)
        try:
            yield
        finally:
            node.draining = True
            await node.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)
            await redis.aclose()
            await pools.close()

    routes = [
        WebSocketRoute("/v1/ws", websocket_endpoint),
        Route("/v1/me", me, methods=["GET"]),
        *health.routes,
        *conversations.routes,
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            AgoraError: _agora_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )


def create_app_from_env() -> Starlette:
    """uvicorn's factory entry point: each worker process builds its own settings and node."""
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    return create_app(settings)
