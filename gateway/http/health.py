"""Liveness, readiness and metrics.

`/readyz` pings every engine, so it is an operator's endpoint, not a client's: it answers a
loopback peer (the container's own health check, an operator on the host) or a request
carrying `Authorization: Bearer $AGORA_OPS_TOKEN`; anyone else gets the 404 of a path that
does not exist. Its answer is kept for a second and concurrent requests share one check,
so a burst of probes costs the engines one round each.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

from prometheus_client.exposition import choose_encoder
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import NotFound
from core.metrics import ProcessRegistry
from gateway import __version__
from gateway.auth import bearer
from gateway.http.common import JSONResponse
from gateway.send import SendPath
from storage.pools import ShardPools

READY_CACHE_S = 1.0
LOOPBACK = frozenset({"127.0.0.1", "::1"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "node": request.app.state.node.id, "version": __version__})


async def _check(coro: object, limit_s: float = 2.0) -> str | None:
    try:
        await asyncio.wait_for(coro, limit_s)  # type: ignore[arg-type]
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]


def operator(request: Request) -> bool:
    """A loopback peer (the socket's, not a forwarded address) or the operator's token."""
    settings = request.app.state.settings
    token = bearer(request.headers.get("authorization"))
    if settings.ops_token and token is not None:
        return hmac.compare_digest(token.encode(), settings.ops_token.encode())
    peer = request.scope.get("client")
    return peer is not None and peer[0] in LOOPBACK


class Readiness:
    """The last readiness answer, for READY_CACHE_S, and the check in flight."""

    def __init__(self) -> None:
        self.answer: tuple[float, int, dict[str, Any]] | None = None
        self.inflight: asyncio.Future[tuple[int, dict[str, Any]]] | None = None
        self.checks = 0  # rounds of pings (observed by tests)

    async def get(self, request: Request) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        if self.answer is not None and now - self.answer[0] < READY_CACHE_S:
            return self.answer[1], self.answer[2]
        if self.inflight is None:
            self.inflight = asyncio.ensure_future(self._check(request))
        try:
            return await asyncio.shield(self.inflight)
        finally:
            if self.inflight is not None and self.inflight.done():
                self.inflight = None

    async def _check(self, request: Request) -> tuple[int, dict[str, Any]]:
        self.checks += 1
        state = request.app.state
        pools: ShardPools = state.pools
        send_path: SendPath = state.send_path
        shards, redis_err, kafka_err = await asyncio.gather(
            pools.ping(),
            _check(state.redis.ping()),
            _check(send_path.producer.client.fetch_all_metadata()),
        )
        down = {name: err for name, err in shards.items() if err}
        if redis_err:
            down["redis"] = redis_err
        if kafka_err:
            down["kafka"] = kafka_err
        body = {
            "status": "unavailable" if down else "ready",
            "down": down,
            "shard_map": pools.version,  # which map this process routes by (a move's switch)
        }
        status = 503 if down else 200
        self.answer = (time.monotonic(), status, body)
        return status, body


async def readyz(request: Request) -> Response:
    if not operator(request):
        raise NotFound("Not Found")
    readiness: Readiness = request.app.state.readiness
    status, body = await readiness.get(request)
    headers = {"Retry-After": "1"} if status != 200 else {}
    return JSONResponse(body, status_code=status, headers=headers)


async def metrics(request: Request) -> Response:
    # Every Agora family is declared in gateway/metrics.py (the registry of this process),
    # next to the library's process_*, python_gc_* and python_info.
    # Text format 0.0.4 unless the scraper asks for OpenMetrics, as on the workers' port.
    # Off the event loop: the process collector lists /proc/self/fd, one entry per
    # connection (12 ms at 10,000). Collectors only read ints and copy small containers.
    registry: ProcessRegistry = request.app.state.registry
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    body = await run_in_threadpool(encode, registry)
    return Response(body, headers={"Content-Type": content_type})


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
