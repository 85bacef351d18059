"""The gateway's composition root: `create_app(settings)` builds every client and pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core import logs
from core.errors import AgoraError, Internal
from core.metrics import ProcessRegistry
from core.settings import Settings
from core.tasks import stop_task
from fanout.feeds import FeedCache
from fanout.kafka import ensure_topics, make_producer, messages_topic, votes_topic, wait_for_broker
from gateway.access import Access
from gateway.admission import Admission
from gateway.auth import TokenVerifier
from gateway.expiry import TokenExpiry
from gateway.feedpages import FeedPages
from gateway.http import (
    asyncapi,
    conversations,
    dev,
    feeds,
    health,
    notifications,
    openapi,
    posts,
    publish,
    web,
)
from gateway.http.common import JSONResponse, error_response, identity
from gateway.metrics import GatewayMetrics, WireMetrics
from gateway.node import Node, make_node_id
from gateway.produceline import make_produce_line
from gateway.ratelimit import ClusterLimiter
from gateway.revocation import RevocationWatcher
from gateway.send import REDIS_TIMEOUT_S, SendPath
from gateway.session import RequestHandler
from gateway.usercap import UserConnectionCap
from gateway.votes import VotePath
from gateway.ws import Endpoint
from storage import shardwatch, users
from storage.ids import IdGenerator
from storage.pgerrors import describe, retryable
from storage.pools import ShardPools
from storage.redis_client import make_lease_redis, make_line, make_redis, make_send_line

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
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}},
        status_code=exc.status_code,
        headers=headers,
    )


def _allowed_methods(request: Request) -> str:
    """Every method of the path. Starlette's own Allow names only the first route that
    matched the path, and a path here is often served by one route per method."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(request.url.path):
            methods |= route.methods
    return ", ".join(sorted(methods))


async def _database_error(request: Request, exc: Exception) -> Response:
    """A conflict the client's retry gets past is `unavailable`; any other database error
    is ours (500, logged). A handler of its own, not `_unexpected`'s: Starlette re-raises
    what reaches the catch-all after answering, and uvicorn logs it as a crash."""
    conflict = retryable(exc)
    if conflict is not None:
        log.warning("%s %s: %s", request.method, request.url.path, describe(exc))
        return error_response(conflict)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(Internal("internal error"))


def _cors(settings: Settings) -> list[Middleware]:
    """Browser pages on AGORA_CORS_ORIGINS may call the HTTP API; none by default. Tokens
    travel as Bearer headers, never cookies, so credentials stay off."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    ]


def create_app(settings: Settings) -> Starlette:
    verifier = TokenVerifier(settings)  # fails fast on missing keys
    dev.check_settings(settings)
    # Built before the app so the ASGI middleware can hold it; node label set in lifespan.
    registry = ProcessRegistry({"role": "gateway"})
    wire_metrics = GatewayMetrics(registry)
    # The WebSocket side (gateway.transport hands it the upgrades of /v1/ws).
    expiry = TokenExpiry()  # sessions whose token ran out are closed (4001)
    endpoint = Endpoint(settings, verifier, wire_metrics, expiry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        pools = ShardPools(settings)
        redis = make_redis(settings)
        await wait_for_broker(settings)
        await ensure_topics(settings)
        producer = make_producer(settings)
        await producer.start()
        lease_redis = make_lease_redis(settings)  # the lease's own: requests never hold it
        # Connects' and disconnects' batched writes: one pipelined connection of their own.
        line = make_line(settings)
        node = Node(settings, make_node_id(settings), redis, pools, lease_redis, line)
        logs.set_process(role="gateway", node=node.id)
        registry.const_labels["node"] = node.id
        access = Access(pools)
        send_path = SendPath(
            redis,
            node.keys,
            producer,
            messages_topic(settings),
            access,
            settings.sends_per_s,
            settings.idempotency_window_s,
            make_send_line(settings, REDIS_TIMEOUT_S),
            make_produce_line(producer, messages_topic(settings), settings.kafka_produce_line),
        )
        state.settings = settings
        state.readiness = health.Readiness()
        state.verifier = verifier
        state.pools = pools
        state.redis = redis
        state.ids = IdGenerator()
        state.node = node
        state.access = access
        state.send_path = send_path
        state.http_limiter = ClusterLimiter(redis, node.keys, "http", settings.http_per_s)
        state.handler = RequestHandler(node, access, send_path, verifier, expiry)
        state.admission = admission = Admission(settings)
        state.feeds = FeedCache(redis, node.keys, pools)
        state.feed_pages = FeedPages(state.feeds, pools, settings.feed_page_cache_ms)
        state.votes = votes = VotePath(
            pools, producer, votes_topic(settings), settings.vote_sweep_s
        )
        node.latency = wire_metrics.latency
        endpoint.bind(node, state.handler, admission)
        endpoint.user_cap = UserConnectionCap(
            redis, node.keys, node.routes, node.id, settings.max_connections_per_user, line
        )
        await node.start()
        state.revocations = RevocationWatcher(redis, node.keys, access, node, pools)
        background = [
            asyncio.create_task(admission.watch_lag()),
            state.http_limiter.start(),
            asyncio.create_task(votes.sweep_forever(redis, node.keys.vote_sweep())),
            asyncio.create_task(expiry.run()),
            await state.revocations.start(),
        ]
        if settings.shard_file:
            background.append(asyncio.create_task(shardwatch.watch(settings, pools)))
        log.info("gateway node %s ready", node.id)
        try:
            yield
        finally:
            node.draining = True
            for task in background:
                await stop_task(task)
            await node.stop()
            if endpoint.user_cap is not None:
                await endpoint.user_cap.stop()  # decrements of the last sessions
            if send_path.produce_line is not None:
                with contextlib.suppress(Exception):  # its records answered or handed over
                    await asyncio.wait_for(send_path.produce_line.close(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)
            await lease_redis.aclose()
            if send_path.line is not None:
                send_path.line.close()
            if line is not None:
                line.close()
            await redis.aclose()
            await pools.close()

    routes = [
        Route("/v1/me", me, methods=["GET"]),
        *health.routes,
        *conversations.routes,
        *publish.routes,
        *notifications.routes,
        *posts.routes,
        *feeds.routes,
        *openapi.routes,
        *asyncapi.routes,
        *(dev.routes if settings.dev_tokens else []),  # absent (404) unless switched on
        *web.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[*_cors(settings), Middleware(WireMetrics, metrics=wire_metrics)],
        exception_handlers={
            AgoraError: _agora_error,
            asyncpg.PostgresError: _database_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.registry = registry
    app.state.endpoint = endpoint
    wire_metrics.bind(app)
    wire_metrics.bind_wire(endpoint.wire)
    return app
