"""Edit, delete, react and reply at the gateway: check, then the send path.

Each change is a message of its own kind (edit | delete | react | unreact) naming its
target in `ref`, produced through `SendPath.send` (so it is idempotent by cid, keyed by
conversation in Kafka, sequenced and delivered like any message). The rules are checked
here against the stored target, so a client hears `forbidden` or `not_found` at once, and
again where the event is sequenced (storage/events.py), which is what holds under races.

A target acked but not stored yet (a client editing the message it just sent) is waited
for briefly. A retry of a cid that was accepted before the target changed (say it was
deleted since) answers with the stored event's id, like a retried send.
"""

from __future__ import annotations

import asyncio

from core.errors import Forbidden, NotFound
from gateway.access import Access
from gateway.send import Accepted, SendPath
from storage import events, messages
from storage.models import Message
from storage.pools import ShardPools

TARGET_WAIT_S = 2.0
TARGET_POLL_S = 0.05


class EventPath:
    def __init__(self, pools: ShardPools, access: Access, send_path: SendPath) -> None:
        self.pools = pools
        self.access = access
        self.send_path = send_path

    async def edit(self, user: str, conv: int, cid: str, ref: int, body: str) -> Accepted:
        return await self._event(user, conv, cid, ref, body, "edit")

    async def delete(self, user: str, conv: int, cid: str, ref: int) -> Accepted:
        return await self._event(user, conv, cid, ref, "", "delete")

    async def react(
        self, user: str, conv: int, cid: str, ref: int, emoji: str, remove: bool
    ) -> Accepted:
        return await self._event(user, conv, cid, ref, emoji, "unreact" if remove else "react")

    async def send(
        self, user: str, conv: int, cid: str, body: str, kind: str, reply_to: int | None
    ) -> Accepted:
        """A send, checking first that the message it answers is in the conversation."""
        if reply_to is not None:
            await self.access.check(user, conv)
            if await self._target(conv, reply_to) is None:
                raise NotFound("the message replied to is not in this conversation")
        return await self.send_path.send(user, conv, cid, body, kind, reply_to=reply_to)

    async def _event(
        self, user: str, conv: int, cid: str, ref: int, body: str, kind: str
    ) -> Accepted:
        await self.access.check(user, conv)
        target = await self._target(conv, ref)
        problem = _refusal(target, user, kind)
        if problem is not None:
            earlier = await messages.stored_id(self.pools, conv, user, cid)
            if earlier is not None:
                return Accepted(*earlier)  # a retry of an accepted event (even a refused one)
            raise problem
        return await self.send_path.send(user, conv, cid, body, kind, ref=ref)

    async def _target(self, conv: int, ref: int) -> Message | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TARGET_WAIT_S
        while True:
            found = await events.target(self.pools, conv, ref)
            if found is not None or loop.time() >= deadline:
                return found
            await asyncio.sleep(TARGET_POLL_S)


def _refusal(target: Message | None, user: str, kind: str) -> NotFound | Forbidden | None:
    if target is None or target.kind not in events.CONTENT_KINDS:
        return NotFound("no such message in this conversation")
    if target.deleted:
        return NotFound("the message is deleted")
    if kind in ("edit", "delete") and target.sender != user:
        return Forbidden("only the sender edits or deletes a message")
    return None
