"""What every HTTP handler shares: authentication, JSON bodies, errors, cursors, limits."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from core.errors import AgoraError, BadRequest, NotFound, RateLimited, TooLarge, Unprocessable
from gateway.auth import Identity, TokenVerifier, bearer
from gateway.ratelimit import ClusterLimiter
from storage.ids import parse_id

MAX_BODY_BYTES = 64 * 1024
DEFAULT_LIMIT = 25
MAX_LIMIT = 100


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: AgoraError) -> JSONResponse:
    headers = {}
    if exc.retry_after_ms is not None or exc.status in (429, 503):
        ms = exc.retry_after_ms if exc.retry_after_ms is not None else 1000
        headers["Retry-After"] = str(max(1, -(-ms // 1000)))
    return JSONResponse(
        {"error": {"code": exc.code, "message": exc.message}},
        status_code=exc.status,
        headers=headers,
    )


def identity(request: Request) -> Identity:
    """The caller, from the Bearer token; also where the per-user HTTP rate limit applies."""
    verifier: TokenVerifier = request.app.state.verifier
    who = verifier.verify(bearer(request.headers.get("authorization")))
    limiter: ClusterLimiter = request.app.state.http_limiter
    wait_ms = limiter.check(who.user)
    if wait_ms:
        raise RateLimited("too many requests", retry_after_ms=wait_ms)
    return who


async def json_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object, read no further than `max_bytes` (then 413)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise TooLarge(f"body over {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"body over {max_bytes} bytes")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Unprocessable("body must be a JSON object")
    return body


def path_id(request: Request, name: str = "id") -> int:
    value = parse_id(request.path_params.get(name, ""))
    if value is None:
        raise NotFound(f"no such {name}")
    return value


def page_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def encode_cursor(*parts: int | str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def decode_cursor(raw: str | None, arity: int) -> list[Any] | None:
    """A cursor made by encode_cursor, or None when absent; BadRequest when tampered."""
    if raw is None or raw == "":
        return None
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise BadRequest("cursor is not valid") from None
    if not isinstance(parts, list) or len(parts) != arity:
        raise BadRequest("cursor is not valid")
    return parts


MAX_CURSOR_INT = (1 << 63) - 1


def decode_int_cursor(raw: str | None, arity: int) -> list[int] | None:
    """A cursor of `arity` non-negative 64-bit integers; BadRequest for anything else (a
    tampered cursor is the client's error, never a 500)."""
    parts = decode_cursor(raw, arity)
    if parts is None:
        return None
    if not all(type(p) is int and 0 <= p <= MAX_CURSOR_INT for p in parts):
        raise BadRequest("cursor is not valid")
    return parts
