"""Handling one client request on a connection: the glue between frames and the node.

Requests of one connection are handled in order (a client's sends reach Kafka in the order
it made them); errors become `err` frames and the connection stays open.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from gateway.access import Access
from gateway.connection import Connection
from gateway.events import EventPath
from gateway.node import Node
from gateway.protocol import frames
from gateway.protocol.frames import (
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
from storage.errors import AgoraError, BadRequest, Internal, Unavailable

log = logging.getLogger("agora.gateway")

MAX_SUBSCRIPTIONS = 1000


class RequestHandler:
    def __init__(self, node: Node, access: Access, send_path: SendPath) -> None:
        self.node = node
        self.access = access
        self.send_path = send_path
        self.events = EventPath(access.pools, access, send_path)
        self.reads = ReadPath(node, access)

    async def handle(self, conn: Connection, req: Request) -> None:
        try:
            await self._handle(conn, req)
        except AgoraError as exc:
            conn.push_frame(frames.err(req.rid, exc))
        except (OSError, aioredis.RedisError) as exc:
            conn.push_frame(frames.err(req.rid, Unavailable(f"dependency unavailable: {exc}")))
        except Exception:
            log.exception("conn %d: %s failed", conn.id, type(req).__name__)
            conn.push_frame(frames.err(req.rid, Internal("internal error")))

    async def _handle(self, conn: Connection, req: Request) -> None:
        if isinstance(req, Ping):
            conn.push_frame(frames.pong(req.rid))
        elif isinstance(req, Send) and req.reply_to is not None:
            accepted = await self.events.send(
                conn.user, req.conv, req.cid, req.body, req.kind, req.reply_to
            )
            conn.push_frame(frames.ack(req.rid, req.cid, accepted.id, accepted.ts))
        elif isinstance(req, Send):
            accepted = await self.send_path.send(conn.user, req.conv, req.cid, req.body, req.kind)
            conn.push_frame(frames.ack(req.rid, req.cid, accepted.id, accepted.ts))
        elif isinstance(req, Read):
            await self.reads.read(conn.user, req.conv, req.seq)
            conn.push_frame(frames.ok(req.rid))
        elif isinstance(req, Edit | Delete | React):
            accepted = await self._event(conn.user, req)
            conn.push_frame(frames.ack(req.rid, req.cid, accepted.id, accepted.ts))
        elif isinstance(req, Sub):
            await self.access.check(conn.user, req.conv)
            if req.conv not in conn.subs and len(conn.subs) >= MAX_SUBSCRIPTIONS:
                raise BadRequest(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
            if req.conv in conn.subs:
                await self.node.unsubscribe(conn, req.conv)
            result = await self.node.subscribe(conn, req.conv, req.since)
            conn.push_frame(frames.subbed(req.rid, req.conv, result["seq"], result["recovered"]))
        elif isinstance(req, Unsub):
            await self.node.unsubscribe(conn, req.conv)
            conn.push_frame(frames.ok(req.rid))
        elif isinstance(req, Typing):
            await self.access.check(conn.user, req.conv)
            await self.node.publish_typing(req.conv, conn.user)

    async def _event(self, user: str, req: Edit | Delete | React) -> Accepted:
        if isinstance(req, Edit):
            return await self.events.edit(user, req.conv, req.cid, req.ref, req.body)
        if isinstance(req, Delete):
            return await self.events.delete(user, req.conv, req.cid, req.ref)
        return await self.events.react(user, req.conv, req.cid, req.ref, req.emoji, req.remove)
