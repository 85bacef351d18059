"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway import __version__
from gateway.http.common import JSONResponse
from gateway.send import SendPath
from storage.metrics import CONTENT_TYPE, Registry
from storage.pools import ShardPools


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "node": request.app.state.node.id, "version": __version__})


async def _check(coro: object, limit_s: float = 2.0) -> str | None:
    try:
        await asyncio.wait_for(coro, limit_s)  # type: ignore[arg-type]
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]


async def readyz(request: Request) -> Response:
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
    status = 503 if down else 200
    headers = {"Retry-After": "1"} if down else {}
    return JSONResponse(
        {"status": "unavailable" if down else "ready", "down": down},
        status_code=status,
        headers=headers,
    )


async def metrics(request: Request) -> Response:
    # Every family is declared in gateway/metrics.py (the registry of this process).
    registry: Registry = request.app.state.registry
    return PlainTextResponse(registry.render(), media_type=CONTENT_TYPE)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
