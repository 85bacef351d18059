"""The publish API: a backend service posts into a conversation, or to a user, with its
own scoped key (gateway/servicekeys.py), like Centrifugo's server API.

The message takes the send path every message takes (idempotent by cid, keyed by
conversation in Kafka, sequenced, delivered, replayable), sent as `service/<name>`; its
`msg` frames carry `service: true`. A service is not a member of the conversations it
posts to: its scope is its permission.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import NotFound, TooLarge, Unprocessable
from gateway.access import Access
from gateway.http.common import JSONResponse, json_body, path_id
from gateway.http.conversations import _announce, _cid_of
from gateway.protocol import fields
from gateway.protocol.frames import USER_ID
from gateway.send import Accepted, SendPath
from gateway.servicekeys import Service, ServiceKeys
from storage import conversations
from storage.ids import IdGenerator
from storage.pools import ShardPools


class ServiceAccess(Access):
    """A service may post to any open conversation its scope names (checked before)."""

    async def check(self, user: str, conv: int, *, fresh: bool = False) -> str:
        self.queries += 1  # never cached: `fresh` changes nothing
        found = await conversations.access(self.pools, conv, user)
        if found is None:
            raise NotFound("no such conversation")
        return found[0]


def _paths(request: Request) -> tuple[ServiceKeys, SendPath]:
    state = request.app.state
    keys: ServiceKeys | None = getattr(state, "service_keys", None)
    if keys is None:
        keys = state.service_keys = ServiceKeys(state.settings.service_keys)
    path: SendPath | None = getattr(state, "service_send_path", None)
    if path is None:
        users: SendPath = state.send_path
        path = state.service_send_path = SendPath(
            users.redis,
            users.keys,
            users.producer,
            users.topic,
            ServiceAccess(state.pools),
            state.settings.service_sends_per_s,
            users.window_s,
            users.line,
        )
    return keys, path


def _text(body: dict[str, Any]) -> tuple[str, str]:
    cid = _cid_of(body)
    text = body.get("body")
    problem = fields.check_body(text)
    if problem is not None:
        raise problem if isinstance(problem, TooLarge) else Unprocessable(problem.message)
    assert isinstance(text, str)
    return cid, text


def _accepted(accepted: Accepted, conv: int) -> Response:
    return JSONResponse(
        {"id": str(accepted.id), "ts": accepted.ts, "conv": str(conv)}, status_code=202
    )


async def _service(request: Request) -> tuple[Service, SendPath]:
    keys, path = _paths(request)
    return keys.verify(request.headers.get("authorization")), path


async def to_conversation(request: Request) -> Response:
    service, path = await _service(request)
    conv = path_id(request)
    service.allow_conversation(conv)
    cid, text = _text(await json_body(request))
    accepted = await path.send(service.sender, conv, cid, text, "text")
    return _accepted(accepted, conv)


async def to_user(request: Request) -> Response:
    """Into the direct conversation of the service and the user (made on first use, and
    announced to the user with `joined`)."""
    service, path = await _service(request)
    user = request.path_params["user"]
    if not USER_ID.match(user):
        raise NotFound("no such user")
    service.allow_user(user)
    cid, text = _text(await json_body(request))
    pools: ShardPools = request.app.state.pools
    ids: IdGenerator = request.app.state.ids
    conv, created = await conversations.create_direct(pools, ids, service.sender, user)
    if created:
        await _announce(request.app.state.node, conv, [user])
    accepted = await path.send(service.sender, conv.id, cid, text, "text")
    return _accepted(accepted, conv.id)


routes = [
    Route("/v1/publish/conversations/{id}", to_conversation, methods=["POST"]),
    Route("/v1/publish/users/{user}", to_user, methods=["POST"]),
]
