"""`GET /v1/ws`, the session side: admission, authentication, then each frame a client sends.

`gateway.transport` hands every checked upgrade to `Endpoint.upgrade` and every whole data
message to `Endpoint.message`. Reading never waits for handling: a message is decoded,
rate-limited and queued synchronously as it arrives, and one task per connection, alive
only while requests wait or are being handled, takes them in order. So a pipelining
client's pongs and close frames are still read while its sends are being handled.

With AGORA_PIPELINE_SENDS (off by default), plain sends (no `reply_to`) are pipelined:
each is handled in a task of its own as soon as it is taken, so one slow ack does not hold
up the sends behind it, and their produce order is kept by a `Turn` each
(gateway/sendorder.py): a client's messages reach Kafka in the order it sent them. Every
other request (and a send repeating the cid of one still in flight) waits until the sends
before it have been answered, and is handled alone; the requests behind it wait for it.
Acks may therefore come back out of order; every reply carries its request's `rid`
(docs/protocol.md). Without the setting every request is handled alone, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import FIRST_COMPLETED
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from core import logs
from core.errors import RateLimited, Unauthorized, Unavailable
from core.settings import Settings
from gateway.admission import Admission
from gateway.auth import TokenVerifier, bearer
from gateway.connection import Connection, WireCounters
from gateway.expiry import TokenExpiry
from gateway.limits import AbusePolicy, TokenBucket
from gateway.protocol import codec as codecs
from gateway.protocol import frames
from gateway.protocol.frames import (
    CloseCode,
    FrameError,
    ProtocolViolation,
    Request,
    Send,
    parse_request,
)
from gateway.protocol.websocket import Upgrade
from gateway.sendorder import Turn
from gateway.usercap import CountUnknown

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics
    from gateway.node import Node
    from gateway.session import RequestHandler
    from gateway.transport import WebSocketLink
    from gateway.usercap import UserConnectionCap

log = logging.getLogger("agora.gateway")

# Requests a connection may have waiting or in flight (pipelined sends being handled),
# besides a request handled alone. Reading never waits for handling: the server keeps
# reading (and so sees the client's pongs) while a pipelining client's sends queue up;
# past this many, further requests are refused, not buffered.
MAX_PENDING_REQUESTS = 256


# A connection's first send in flight is always handled at once (as when requests were
# handled one at a time); the further ones it pipelines share this node-wide number of
# slots, a share of the Redis pool (each send held a pooled connection for its claim and
# again for its record; on a single Redis both now go over the send path's own pipelined
# connection, storage/redisline.py, and the slots only bound the sends in flight).
# Unbounded, 25 pipelining senders on an overloaded node kept every pooled connection busy
# long enough that the node's own lease renewal timed out for 9 s, and it shed all its
# connections (bench/RESULTS.md, issue 14, run A3).
def pipeline_slots(settings: Settings) -> int:
    return max(1, settings.redis_pool_max // 4)


class _ReadLimits:
    __slots__ = ("abuse", "bucket")

    def __init__(self, frames_per_s: int) -> None:
        self.bucket = TokenBucket(frames_per_s, 2 * frames_per_s)
        self.abuse = AbusePolicy()


class Endpoint:
    """The WebSocket endpoint of one gateway node. Built with the app; `bind` gives it the
    node's parts once the app's lifespan has made them."""

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        metrics: GatewayMetrics,
        expiry: TokenExpiry | None = None,
    ):
        self.settings = settings
        self.max_frame_bytes = settings.max_frame_bytes
        self.max_fragments = settings.max_fragments
        self.verifier = verifier
        self.expiry = expiry if expiry is not None else TokenExpiry()
        self.metrics = metrics
        self.wire = {False: WireCounters(), True: WireCounters()}  # by codec.binary
        self.links: set[WebSocketLink] = set()  # every upgraded socket until it is gone
        self._none_left: asyncio.Event | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self.send_slots = asyncio.Semaphore(pipeline_slots(settings))
        self.user_cap: UserConnectionCap | None = None
        self.node: Node
        self.handler: RequestHandler
        self.admission: Admission

    def bind(self, node: Node, handler: RequestHandler, admission: Admission) -> None:
        self.node = node
        self.handler = handler
        self.admission = admission

    def closed_by_server(self, code: int) -> None:
        self.metrics.count_close(code)

    def forget(self, link: WebSocketLink) -> None:
        """`link`'s socket is closed."""
        self.links.discard(link)
        if not self.links and self._none_left is not None:
            self._none_left.set()

    async def wait_closed(self, seconds: float) -> bool:
        """Wait until every upgraded socket is closed (their close handshakes done), at
        most `seconds`; False if some are still open then."""
        if not self.links:
            return True
        self._none_left = asyncio.Event()
        try:
            await asyncio.wait_for(self._none_left.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # -- opening --------------------------------------------------------------------------------
    def upgrade(
        self,
        link: WebSocketLink,
        client: tuple[str, int] | None,
        query: bytes,
        upgrade: Upgrade,
    ) -> None:
        ip = client[0] if client else "?"
        admission = self.admission
        # Every upgraded socket counts while it exists (not only sessions: a refused one
        # lingers in its close handshake), except this one and those still handshaking,
        # which admission counts itself.
        sockets = max(len(self.node.connections), len(self.links) - 1 - admission.handshakes)
        refusal = admission.check(sockets, self.node.draining, ip, self.node.cut_off)
        if refusal is not None:
            self.metrics.denials.labels(str(refusal.status)).inc()
            link.refuse(
                refusal.status,
                f"{refusal.reason}; retry later\n",
                (("Retry-After", str(refusal.retry_after_s)),),
            )
            return
        admission.handshakes += 1
        task = asyncio.create_task(self._open(link, query, upgrade))
        self._opening.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._opening.discard)

    async def _open(self, link: WebSocketLink, query: bytes, upgrade: Upgrade) -> None:
        """Authenticate, accept, register, count, say hello."""
        try:
            conn = self._accept(link, query, upgrade)
        finally:
            # A handshake until here; from the next line on (no await between) the
            # connection is in node.connections, which admission counts instead.
            self.admission.handshakes -= 1
        if conn is None:
            return
        try:
            await self.node.attach(conn)
        except Exception as exc:
            log.warning("conn %d: routing registration failed: %s", conn.id, exc)
            conn.greet()
            conn.close(CloseCode.TRY_AGAIN_LATER, "routing unavailable")
            return
        if conn.close_code is not None:
            return  # the peer left while we registered it
        # hello goes out once the session is routed and counted (docs/protocol.md): a
        # client that has it gets every frame for its user sent after it, and a session
        # opened after it is the one the cap refuses.
        cap = self.user_cap
        if cap is not None:
            try:
                admitted = await cap.admit(conn.user)
            except CountUnknown as exc:
                # Maybe counted (Redis may have applied it): released as a counted session
                # (gateway/usercap.py). Not refused for it either.
                log.warning("conn %d: session count unknown: %s", conn.id, exc)
                admitted = True
                conn.on_close(lambda c: cap.release(c.user))
            except Exception as exc:  # Redis down: sessions are not worth refusing for it
                log.warning("conn %d: session count unavailable: %s", conn.id, exc)
                admitted = True
            else:
                if admitted:
                    conn.on_close(lambda c: cap.release(c.user))
            if not admitted:
                conn.greet()  # hello, then 4008 (docs/protocol.md)
                conn.close(CloseCode.RATE_LIMITED, "too many connections for this user")
                return
            if conn.close_code is not None:
                return
        conn.greet()
        link.opened()

    def _accept(self, link: WebSocketLink, query: bytes, upgrade: Upgrade) -> Connection | None:
        codec, echoed = codecs.choose(list(upgrade.subprotocols))
        token = bearer(upgrade.authorization) or _query_token(query)
        settings = self.settings
        if link.lost or link.broken:
            return None  # gone (or cut off) before we got to it
        try:
            identity = self.verifier.verify(token)
        except Unauthorized as exc:
            # Accept first: a browser cannot read an HTTP refusal, but it sees a close code.
            link.accept(echoed, upgrade.key)
            self.metrics.ws_opened.inc()
            link.send_close(CloseCode.UNAUTHORIZED, exc.message[:120])
            return None
        link.accept(echoed, upgrade.key)
        self.metrics.ws_opened.inc()
        conn = Connection(
            link,
            codec,
            identity.user,
            settings.outbound_max_frames,
            settings.outbound_max_bytes,
            self.wire[codec.binary],
        )
        node = self.node
        conn.on_close(node.detach)
        link.conn = conn
        # hello is the first frame (docs/protocol.md) and goes out once the connection is
        # registered (`_open`): frames for the user that arrive meanwhile wait behind it.
        # Requests wait until registration is done.
        conn.hold_greeting(
            frames.hello(
                identity.user,
                node.id,
                settings.heartbeat_ms,
                settings.max_frame_bytes,
                identity.exp,
            )
        )
        self.expiry.watch(conn, identity.exp + self.verifier.leeway_s)
        return conn

    # -- each frame -----------------------------------------------------------------------------
    def charge(self, conn: Connection, n: int, rid: int | None = None) -> bool:
        """Count `n` frames against the connection's budget (every frame counts: data,
        control, continuation fragments). False when over it: answered `err
        rate_limited` (with `rid`), or closed with 4008 when it goes on."""
        limits = conn.limits
        if limits is None:
            limits = conn.limits = _ReadLimits(self.settings.frames_per_s)
        now = time.monotonic()
        refused, wait_ms = limits.bucket.spend(now, n)
        if not refused:
            return True
        if limits.abuse.refused(now, refused):
            conn.close(CloseCode.RATE_LIMITED, "too many frames")
        else:
            conn.push_frame(frames.err(rid, RateLimited("too many frames", retry_after_ms=wait_ms)))
        return False

    def message(self, conn: Connection, data: bytes | str) -> None:
        wire = conn.wire
        wire.frames_in += 1
        wire.bytes_in += len(data)
        try:
            decoded = conn.codec.decode(data)
        except ProtocolViolation as exc:
            conn.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
            return
        # Counted before the frame is looked at: a malformed request costs its sender
        # as much budget as a good one.
        if not self.charge(conn, 1, _rid_of(decoded)):
            return
        try:
            req = parse_request(decoded)
        except ProtocolViolation as exc:
            conn.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
            return
        except FrameError as exc:
            conn.push_frame(frames.err(exc.rid, exc.error))
            return
        if conn.pending_close is not None:
            conn.push_frame(frames.err(req.rid, Unavailable("server shutting down")))
        elif len(conn.requests) + len(conn.flight) >= MAX_PENDING_REQUESTS:
            conn.push_frame(
                frames.err(req.rid, RateLimited("too many requests in flight", retry_after_ms=100))
            )
        else:
            conn.requests.append(req)
            if conn.handler_task is None:
                handling = _handle_requests(
                    conn, self.handler, self.send_slots, self.settings.pipeline_sends
                )
                conn.handler_task = asyncio.create_task(handling)
            elif conn.wake is not None and not conn.wake.done():
                conn.wake.set_result(None)  # the handler waits for sends in flight: take it


def _rid_of(frame: object) -> int | None:
    """The request's rid when it has a usable one (to answer a refusal with)."""
    if isinstance(frame, dict):
        rid = frame.get("rid")
        if type(rid) is int and 0 <= rid <= frames.MAX_RID:
            return rid
    return None


def _query_token(query: bytes) -> str | None:
    if not query:
        return None
    values = parse_qs(query.decode("latin-1")).get("token")
    return values[0] if values else None


# The pipelined sends' tasks (the loop holds tasks weakly). They are not cancelled when
# their connection goes: a send runs to its end anyway (gateway/send.py), and the turns of
# the sends after it must be released in order.
_sends: set[asyncio.Task[None]] = set()


def _pipelined(req: Request) -> bool:
    """A send handled beside the others: a plain one (a reply checks its target first)."""
    return isinstance(req, Send) and req.reply_to is None


def _start_send(
    conn: Connection, handler: RequestHandler, req: Send, slots: asyncio.Semaphore | None
) -> None:
    """Handle `req` in a task of its own; `slots`: the node-wide slot it holds, if any."""
    turn = Turn(conn.turn)
    conn.turn = turn
    task = asyncio.create_task(handler.handle(conn, req, turn))
    _sends.add(task)
    conn.flight[req.cid] = task
    cid = req.cid

    def done(t: asyncio.Task[None]) -> None:
        _sends.discard(t)
        if conn.flight.get(cid) is t:
            del conn.flight[cid]
        turn.abandon()  # a task cancelled before the send path took its turn
        if slots is not None:
            slots.release()

    task.add_done_callback(done)


async def _handle_requests(
    conn: Connection, handler: RequestHandler, slots: asyncio.Semaphore, pipeline: bool
) -> None:
    """Take a connection's requests in order: with `pipeline` (AGORA_PIPELINE_SENDS) plain
    sends are started at once (pipelined, produced in order), any other request after every
    earlier one has been answered; without it every request is handled alone, one at a
    time. Exists only while there are requests waiting or sends in flight."""
    logs.bind_connection(conn.id)  # this task's log lines carry the connection's id
    conn.busy = True
    flight = conn.flight
    try:
        while conn.close_code is None and conn.pending_close is None:
            if not conn.requests:
                if not flight:
                    break
                # Wait for a send to end or a request to arrive (Endpoint.message wakes us).
                wake = conn.wake = asyncio.get_running_loop().create_future()
                try:
                    waits = (wake, *flight.values())
                    await asyncio.wait(waits, return_when=FIRST_COMPLETED)
                finally:
                    conn.wake = None
                continue
            req = conn.requests[0]
            if isinstance(req, Send) and req.cid in flight:
                # The same cid again while its first send is in flight: after it, so it gets
                # that send's id (its record is acked or failed by then, never pending).
                await asyncio.wait((flight[req.cid],))
                continue
            if pipeline and _pipelined(req):
                slot = None
                if flight:  # a further send in flight: it needs one of the node's slots
                    if slots.locked():
                        # Until one of its own sends ends (then a slot, or none needed).
                        await asyncio.wait(tuple(flight.values()), return_when=FIRST_COMPLETED)
                        continue
                    await slots.acquire()  # free: does not wait
                    slot = slots
                conn.requests.popleft()
                _start_send(conn, handler, req, slot)
                continue
            if flight:
                await asyncio.wait(tuple(flight.values()))  # the sends before it answered first
                continue
            conn.requests.popleft()
            await handler.handle(conn, req)
        if conn.pending_close is not None and conn.close_code is None:
            if flight:  # their replies go out before the close
                await asyncio.wait(tuple(flight.values()))
            conn.requests.clear()  # never accepted: the client retries them elsewhere
            conn.close(conn.pending_close, "server shutting down")  # after the replies
    finally:
        conn.busy = False
        conn.handler_task = None
