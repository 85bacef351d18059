"""Handling one client request on a connection: the glue between frames and the node.

gateway/ws.py decides what runs when: a connection's plain sends are pipelined (each with
a `Turn` that keeps their produce order, gateway/sendorder.py), every other request is
handled alone. Errors become `err` frames and the connection stays open.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis

from core.errors import AgoraError, BadRequest, Internal, Unauthorized, Unavailable
from gateway.access import Access
from gateway.auth import TokenVerifier
from gateway.connection import Connection
from gateway.events import EventPath
from gateway.expiry import TokenExpiry
from gateway.limits import BucketMap
from gateway.node import Node
from gateway.protocol import frames
from gateway.protocol.frames import (
    Auth,
    CloseCode,
    Delete,
    Edit,
    Ping,
    React,
    Read,
    Request,
    Send,
    Sub,
    Typing,
    Unsub,
)
from gateway.readstate import ReadPath
from gateway.send import Accepted, SendPath
from gateway.sendorder import Turn
from storage.pgerrors import describe, retryable

log = logging.getLogger("agora.gateway")

MAX_SUBSCRIPTIONS = 1000
TYPING_EVERY_S = 2  # one `typing` per user per conversation passed on per this, cluster-wide


class RequestHandler:
    def __init__(
        self,
        node: Node,
        access: Access,
        send_path: SendPath,
        verifier: TokenVerifier | None = None,
        expiry: TokenExpiry | None = None,
    ) -> None:
        self.node = node
        self.access = access
        self.send_path = send_path
        self.verifier = verifier
        self.expiry = expiry
        # Typing is fanned out to every subscriber (a public thread may have thousands):
        # a node-local bucket drops repeats without a round trip, a Redis key per (conv,
        # user) drops those from the user's other nodes.
        self._typing = BucketMap(1 / TYPING_EVERY_S, 1)
        self.events = EventPath(access.pools, access, send_path)
        self.reads = ReadPath(node, access)

    async def handle(self, conn: Connection, req: Request, turn: Turn | None = None) -> None:
        """Handle `req` and answer it; `turn`: a pipelined plain send's produce order."""
        try:
            await self._handle(conn, req, turn)
        except AgoraError as exc:
            conn.push_frame(frames.err(req.rid, exc))
        except (OSError, aioredis.RedisError) as exc:
            conn.push_frame(frames.err(req.rid, Unavailable(f"dependency unavailable: {exc}")))
        except Exception as exc:
            conflict = retryable(exc)
            if conflict is not None:
                log.warning("conn %d: %s: %s", conn.id, type(req).__name__, describe(exc))
                conn.push_frame(frames.err(req.rid, conflict))
                return
            log.exception("conn %d: %s failed", conn.id, type(req).__name__)
            conn.push_frame(frames.err(req.rid, Internal("internal error")))

    async def _handle(self, conn: Connection, req: Request, turn: Turn | None) -> None:
        if isinstance(req, Ping):
            conn.push_frame(frames.pong(req.rid))
        elif isinstance(req, Send) and req.reply_to is not None:
            accepted = await self.events.send(
                conn.user, req.conv, req.cid, req.body, req.kind, req.reply_to
            )
            conn.push_frame(frames.ack(req.rid, req.cid, accepted.id, accepted.ts))
        elif isinstance(req, Send):
            accepted = await self.send_path.send(
                conn.user, req.conv, req.cid, req.body, req.kind, turn=turn
            )
            conn.push_frame(frames.ack(req.rid, req.cid, accepted.id, accepted.ts))
        elif isinstance(req, Read):
            await self.reads.read(conn.user, req.conv, req.seq)
            conn.push_frame(frames.ok(req.rid))
        elif isinstance(req, Edit | Delete | React):
            accepted = await self._event(conn.user, req)
            conn.push_frame(frames.ack(req.rid, req.cid, accepted.id, accepted.ts))
        elif isinstance(req, Sub):
            generation = self.access.generation
            await self.access.check(conn.user, req.conv)
            if req.conv not in conn.subs and len(conn.subs) >= MAX_SUBSCRIPTIONS:
                raise BadRequest(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
            if req.conv in conn.subs:
                await self.node.unsubscribe(conn, req.conv)
            result = await self.node.subscribe(conn, req.conv, req.since)
            if self.access.generation != generation:
                # A revocation came while this subscription was being made: the check
                # may have read the old membership, and the revocation may have found
                # no subscription to end yet. Ask the shard again.
                try:
                    await self.access.check(conn.user, req.conv, fresh=True)
                except AgoraError:
                    await self.node.unsubscribe(conn, req.conv)
                    raise
            conn.push_frame(frames.subbed(req.rid, req.conv, result["seq"], result["recovered"]))
        elif isinstance(req, Unsub):
            await self.node.unsubscribe(conn, req.conv)
            conn.push_frame(frames.ok(req.rid))
        elif isinstance(req, Auth):
            self._auth(conn, req)
        elif isinstance(req, Typing):
            await self.access.check(conn.user, req.conv)
            if self._typing.take(f"{req.conv}:{conn.user}", time.monotonic()):
                return  # dropped: this user typed here less than TYPING_EVERY_S ago
            key = self.node.keys.typing(req.conv, conn.user)
            if await self.node.redis.set(key, b"1", nx=True, px=TYPING_EVERY_S * 1000):
                await self.node.publish_typing(req.conv, conn.user)

    def _auth(self, conn: Connection, req: Auth) -> None:
        """A newer token for the same user: the session lives until its `exp` instead."""
        assert self.verifier is not None and self.expiry is not None
        try:
            who = self.verifier.verify(req.token)
            if who.user != conn.user:
                raise Unauthorized("token is for another user")
            deadline = who.exp + self.verifier.leeway_s
            if deadline < conn.token_deadline:
                raise Unauthorized("token expires before the current one")
        except Unauthorized as exc:
            if time.time() >= conn.token_deadline - self.verifier.leeway_s:
                # The session's own token has expired (only the leeway is left): a bad
                # replacement ends it now.
                conn.push_frame(frames.err(req.rid, exc))
                conn.close(CloseCode.UNAUTHORIZED, exc.message[:120])
                return
            raise
        self.expiry.watch(conn, deadline)
        conn.push_frame(frames.ok(req.rid, exp=who.exp))

    async def _event(self, user: str, req: Edit | Delete | React) -> Accepted:
        if isinstance(req, Edit):
            return await self.events.edit(user, req.conv, req.cid, req.ref, req.body)
        if isinstance(req, Delete):
            return await self.events.delete(user, req.conv, req.cid, req.ref)
        return await self.events.react(user, req.conv, req.cid, req.ref, req.emoji, req.remove)
