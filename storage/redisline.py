"""One pipelined Redis connection for the send path's two commands per send (the claim
script and the record's SET).

Through redis-py each command takes a pooled connection (a Condition and a timeout to
acquire it), writes in a `wait_for` task of its own (its socket timeout) and parses
through several layers: ~90 us of gateway CPU per command on the bench machine, against
~30 us here (bench/RESULTS.md, issue 14, "The send path's Redis commands"). Here every
command is written at once on one connection and its reply is matched in order (Redis
answers a connection's commands in the order they came), so concurrent sends share the
connection without waiting for one another.

For short, non-blocking commands only: one slow command delays every reply behind it.
Not for a Redis Cluster (a command goes to its slot's master: redis-py's cluster client
does that) nor for TLS or unix sockets (`RedisLine.supports`); the send path keeps
redis-py there.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


class NotSent(RedisConnectionError):
    """Nothing of the command was written (no connection, or it could not be made, or
    Redis refused its AUTH or SELECT): Redis did not run it. Unlike a connection lost or
    a timeout once written, after which the command may have run."""


class _Replies:
    """The replies of several commands written together (`_Protocol.call_many`): stands
    in the reply queue once per command, and answers its future with every reply, in
    order, once the last has come; a command's error fails it then (as redis-py's
    pipelines raise the first error) unless `raise_on_error` is False (the error is then
    a reply in its place), a lost connection at once."""

    __slots__ = ("error", "fut", "left", "raise_on_error", "replies")

    def __init__(self, fut: asyncio.Future[list[Any]], n: int, raise_on_error: bool) -> None:
        self.fut = fut
        self.left = n
        self.raise_on_error = raise_on_error
        self.replies: list[Any] = []
        self.error: Exception | None = None

    def done(self) -> bool:
        return self.fut.done()

    def set_result(self, reply: Any) -> None:
        self.replies.append(reply)
        self.left -= 1
        if self.left == 0:
            if self.error is not None and self.raise_on_error:
                self.fut.set_exception(self.error)
            else:
                self.fut.set_result(self.replies)

    def set_exception(self, exc: Exception) -> None:
        if isinstance(exc, ResponseError):  # one command's error: a reply like the others
            if self.error is None:
                self.error = exc
            self.set_result(exc)
        else:  # the connection is gone: no more replies come
            self.fut.set_exception(exc)


_SKIP_ARGS: tuple[Any, ...] = ("CLIENT", "REPLY", "SKIP")
_SKIP_REPLY = hiredis.pack_command(_SKIP_ARGS)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any] | _Replies] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        # Redis takes CLIENT REPLY SKIP (probed on connect: `RedisLine._open`).
        self.skips_replies = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply to nothing asked: the stream can no longer be trusted
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            fut = waiting.popleft()
            if fut.done():
                continue  # its caller gave up (cancelled, or the connection timed out)
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(ResponseError(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisConnectionError(f"Redis connection lost: {exc or 'closed'}")
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(self.lost)

    def fail(self, exc: Exception) -> None:
        """Give the connection up: what waits on it fails with `exc`."""
        if self.lost is None:
            self.lost = exc
        if self.transport is not None:
            self.transport.close()
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def call(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.lost is not None or self.transport is None:
            fut.set_exception(NotSent(str(self.lost or "not connected")))
            return fut
        self.transport.write(hiredis.pack_command(args))
        self.waiting.append(fut)
        return fut

    def send(self, args: tuple[Any, ...]) -> None:
        """A command nobody waits for. Redis is asked not to answer it (CLIENT REPLY
        SKIP, in the same write) where it can: no reply to read, parse and drop, and on
        a quiet connection no wake-up of the loop for it (a send's record SET: about a
        fifth of the event loop's wake-ups per send, bench/RESULTS.md)."""
        if self.skips_replies and self.lost is None and self.transport is not None:
            self.transport.write(_SKIP_REPLY + hiredis.pack_command(args))
            return
        self.call(args).add_done_callback(_retrieved)

    def call_many(
        self, commands: list[tuple[Any, ...]], raise_on_error: bool = True
    ) -> asyncio.Future[list[Any]]:
        """Several commands in one write; their replies in order (see `_Replies`)."""
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not commands:
            fut.set_result([])
            return fut
        if self.lost is not None or self.transport is None:
            fut.set_exception(NotSent(str(self.lost or "not connected")))
            return fut
        self.transport.write(b"".join([hiredis.pack_command(c) for c in commands]))
        replies = _Replies(fut, len(commands), raise_on_error)
        self.waiting.extend([replies] * len(commands))
        return fut


class RedisLine:
    """A lazily (re)connected, pipelined connection to one Redis."""

    def __init__(self, url: str, timeout_s: float) -> None:
        params = parse_url(url)
        if not self.supports(url):
            raise ValueError(f"RedisLine needs a redis:// URL over TCP, not {url!r}")
        self.host: str = params.get("host", "localhost")
        self.port: int = int(params.get("port", 6379))
        self.db: int = int(params.get("db", 0))
        self.username: str | None = params.get("username")
        self.password: str | None = params.get("password")
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._scripts: dict[str, bytes] = {}  # sha -> body, for NOSCRIPT (Redis restarted)
        self.connects = 0
        self._unwaited: set[asyncio.Future[Any]] = set()  # held: the loop holds tasks weakly
        self._queued: list[tuple[Any, ...]] = []  # `send` while not connected

    @staticmethod
    def supports(url: str) -> bool:
        return url.startswith("redis://") and "connection_class" not in parse_url(url)

    async def execute(self, *args: Any) -> Any:
        """One command's reply; redis-py's ResponseError, ConnectionError or TimeoutError.
        A command unanswered within the timeout closes the connection (it may be half
        open): the commands in flight on it fail, the next one connects again."""
        return await self._run(args, None)

    async def pipeline(
        self, commands: list[tuple[Any, ...]], *, raise_on_error: bool = True
    ) -> list[Any]:
        """Several commands written together (one system call, plain commands: a Redis
        script call costs Redis ~10 us more than the commands it runs); their replies in
        order. The first command error raises once every reply is in (redis-py's
        pipelines do the same; the other commands have run), or with `raise_on_error`
        False is left in its place among the replies (a ResponseError: redis-py's
        `execute(raise_on_error=False)`) for a caller whose commands are independent;
        timeouts and a lost connection raise as `execute`."""
        replies: list[Any] = await self._run(None, commands, raise_on_error)
        return replies

    async def _run(
        self,
        args: tuple[Any, ...] | None,
        commands: list[tuple[Any, ...]] | None,
        raise_on_error: bool = True,
    ) -> Any:
        proto = self._proto
        connected = False
        try:
            async with asyncio.timeout(self.timeout_s):
                if proto is None or proto.lost is not None:
                    proto = await self._connect()
                connected = True
                if commands is not None:
                    return await proto.call_many(commands, raise_on_error)
                return await proto.call(cast(tuple[Any, ...], args))
        except TimeoutError:
            if not connected:  # still connecting: nothing written
                raise NotSent("Redis did not accept a connection in time") from None
            timeout = RedisTimeoutError("Redis did not answer in time")
            if proto is not None:
                proto.fail(timeout)
            raise timeout from None
        except OSError as exc:
            # Only connecting raises it here (a transport's writes do not): nothing sent.
            raise NotSent(f"Redis unreachable: {exc}") from None
        except RedisError as exc:
            if connected:
                raise
            # Connected, but its AUTH or SELECT refused (a password changed, a user
            # disabled) or the connection lost during them: the command was not written.
            raise NotSent(f"Redis refused the connection: {exc}") from exc

    def send(self, *args: Any) -> None:
        """One command written and not waited for: Redis is asked for no reply where it
        can be (`_Protocol.send`), else its reply (or failure) is dropped. A command
        awaited after it on this line is answered after it has run."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            # Written first once connected, before any command awaited meanwhile.
            self._queued.append(args)
            if self._connecting is None or self._connecting.done():
                task = asyncio.ensure_future(self._connect())
                self._unwaited.add(task)
                task.add_done_callback(self._dropped)
            return
        proto.send(args)

    def _dropped(self, task: asyncio.Future[Any]) -> None:
        self._unwaited.discard(task)
        _retrieved(task)

    def script(self, body: str) -> str:
        """Register a Lua script; its sha for `evalsha`."""
        sha = hashlib.sha1(body.encode()).hexdigest()
        self._scripts[sha] = body.encode()
        return sha

    async def evalsha(self, sha: str, keys: list[Any], args: list[Any]) -> Any:
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # A Redis restarted (or flushed its scripts): EVAL loads it again.
            return await self.execute("EVAL", self._scripts[sha], len(keys), *keys, *args)

    async def _connect(self) -> _Protocol:
        # Concurrent callers share one attempt. One that ended while nobody waited for it
        # (its callers timed out) is not reused: its connection may be gone since.
        if self._connecting is not None and self._connecting.done():
            self._connecting = None
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(_retrieved)
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                transport, proto = await loop.create_connection(_Protocol, self.host, self.port)
                try:
                    if self.password is not None:
                        user = () if self.username is None else (self.username,)
                        await proto.call(("AUTH", *user, self.password))
                    if self.db:
                        await proto.call(("SELECT", self.db))
                    # Whether `send` may ask for no reply: Redis >= 3.2 answers OK; a
                    # Redis or proxy without the command (or with CLIENT renamed away)
                    # answers an error, and every reply is then read as before.
                    try:
                        await proto.call(("CLIENT", "REPLY", "ON"))
                        proto.skips_replies = True
                    except ResponseError:
                        pass
                except BaseException:
                    transport.close()
                    raise
        except BaseException:
            self._queued.clear()  # commands nobody waits for: their failure is dropped
            raise
        queued, self._queued = self._queued, []
        for args in queued:
            proto.send(args)
        self._proto = proto
        self.connects += 1
        return proto

    def close(self) -> None:
        proto = self._proto
        if proto is not None:
            proto.fail(RedisConnectionError("closed"))
        self._proto = None


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """A reply nobody waits for: its exception is retrieved (asyncio logs none)."""
    if not fut.cancelled():
        fut.exception()
