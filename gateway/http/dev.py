"""`POST /v1/dev/token`: a signed token for any user, for the demo app and local testing.

Mounted only when AGORA_DEV_TOKENS=true (otherwise the path is a plain 404): whoever can
reach it can be anyone, so it must never be on in production. It signs with the same
HMAC secret the gateway verifies with, so it needs an HS* algorithm and AGORA_JWT_SECRET.
A gateway with it refuses to start on a non-loopback address (`check_bind`), and the
endpoint answers only requests that arrived on a loopback address, so a dev setting that
leaks into a deployment exposes nothing.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import ConfigError, NotFound, Unprocessable
from core.settings import Settings
from gateway.auth import make_token
from gateway.http.common import JSONResponse, json_body
from gateway.protocol.frames import USER_ID

TOKEN_TTL_S = 24 * 3600
MAX_NAME = 100
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def check_bind(settings: Settings, host: str) -> None:
    """Dev mode only on a loopback bind: never where others can reach the token endpoint."""
    if settings.dev_tokens and host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise ConfigError(
            f"AGORA_DEV_TOKENS=true serves tokens for any user: only on a loopback address "
            f"(--host 127.0.0.1), not {host}"
        )


def check_settings(settings: Settings) -> None:
    """Fail at start-up, not at the first sign-in, when tokens could not be signed."""
    if not settings.dev_tokens:
        return
    if not settings.jwt_secret or not any(a.startswith("HS") for a in settings.jwt_algorithms):
        raise ConfigError(
            "AGORA_DEV_TOKENS=true needs an HS* algorithm in AGORA_JWT_ALGORITHMS "
            "and AGORA_JWT_SECRET"
        )


async def issue(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    local = request.scope.get("server")
    if not local or not (str(local[0]) in LOOPBACK_HOSTS or str(local[0]).startswith("127.")):
        raise NotFound("Not Found")  # reached on a public address: as if it did not exist
    body = await json_body(request)
    user = body.get("user")
    if not isinstance(user, str) or not USER_ID.match(user):
        raise Unprocessable("user must be a user id (1-64 chars of [A-Za-z0-9_.:-])")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME):
        raise Unprocessable(f"name must be a string of 1-{MAX_NAME} chars")
    alg = next(a for a in settings.jwt_algorithms if a.startswith("HS"))
    token = make_token(
        settings.jwt_secret,
        user,
        name,
        TOKEN_TTL_S,
        alg,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )
    expires = int(time.time()) + TOKEN_TTL_S
    return JSONResponse({"token": token, "user": user, "expires_at": expires * 1000})


routes = [Route("/v1/dev/token", issue, methods=["POST"])]
