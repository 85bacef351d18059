"""A client that stays connected: reconnect, resubscribe with `since`, retry unacked sends.

`ReconnectingClient` owns one `AgoraClient` connection at a time and replaces it when it
drops, following docs/protocol.md (policy.Backoff): full-jitter backoff; a 503/429 refusal's
Retry-After and close 1013 are floors; a draining node's `reconnect.after_ms` is when to
move; 4001 waits for `set_token`. After each (re)connect it subscribes again to every
conversation with `since` = the last seq it delivered, so the server replays what was
missed, and drops anything at or below that seq (no duplicate reaches `events`). A `send`
is retried with the same `cid` until acknowledged: the server turns a repeated cid into
the first message's id, so a lost ack never becomes a second message.

Tokens: with a `token_provider` (an async callable returning a fresh token), the client
sends `auth {token}` before the session's token expires (`hello.exp`, then the `exp` of
each `ok`), so the server does not close it (4001 at exp + leeway); after a 4001 it asks
the provider for a token and reconnects instead of waiting for `set_token`. `unsubbed`
(the user was removed, left, or the conversation closed) ends that subscription here too:
it is not resubscribed after a reconnect.

Frames other than replies land in `events` (`msg` deduplicated and in order per
conversation; `typing`, `score`, `joined`, and `gap` when the server could not replay
everything: fetch that range over HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from agora_client.client import AgoraClient, Closed, ServerError
from agora_client.policy import ABNORMAL, Backoff

log = logging.getLogger("agora_client")

RETRIABLE_ERRORS = frozenset({"unavailable", "rate_limited"})
TokenProvider = Callable[[], Awaitable[str]]
# The connection went away under a request (as our error, or as websockets' own).
LOST = (ConnectionError, ConnectionClosed)


@dataclass
class _Sub:
    last_seq: int | None  # the last seq delivered (or the `since` the caller gave)
    asked_since: int | None = None  # `since` of the sub in flight


class ReconnectingClient:
    def __init__(
        self,
        urls: str | Sequence[str],
        token: str,
        *,
        encoding: str = "json",
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
        stable_after_s: float = 5.0,
        use_header: bool = True,
        token_provider: TokenProvider | None = None,
        refresh_margin_s: float = 30.0,
    ) -> None:
        self.token_provider = token_provider
        self.refresh_margin_s = refresh_margin_s
        self.refreshes = 0  # tokens the server took over an open connection (`auth`)
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.token = token
        self.encoding = encoding
        self.backoff = backoff or Backoff()
        self.request_timeout = request_timeout
        self.stable_after_s = stable_after_s
        self.use_header = use_header
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.conn: AgoraClient | None = None
        self.state = "idle"  # idle | connecting | open | waiting | unauthorized | closed
        self.connects = 0  # connections that reached `hello`
        self.attempts = 0  # connection attempts, successful or not
        self.duplicates_dropped = 0
        self.drains = 0  # `reconnect` frames received (a node draining under us)
        self.last_close: int | None = None
        self._subs: dict[str, _Sub] = {}
        self._ready = asyncio.Event()  # open, resubscribed: requests may go out
        self._token_changed = asyncio.Event()
        self._drain_at: float | None = None
        self._drop: asyncio.TimerHandle | None = None
        self._runner: asyncio.Task[None] | None = None
        self._url_turn = itertools.count()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Start connecting in the background; with `wait`, until the first `hello`."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        if wait:
            await asyncio.wait_for(self._ready.wait(), timeout)

    async def close(self) -> None:
        self.state = "closed"
        self._ready.clear()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    def set_token(self, token: str) -> None:
        """A new token for the next connection; ends the wait after a 4001."""
        self.token = token
        self._token_changed.set()

    async def _run(self) -> None:
        attempt = 0
        while self.state != "closed":
            if self.state == "unauthorized":
                if self.token_provider is not None and not self._token_changed.is_set():
                    try:
                        self.token = await self.token_provider()
                        self._token_changed.set()
                    except Exception as exc:
                        log.warning("token provider failed: %s", exc)
                        await asyncio.sleep(self.backoff.delay(None, attempt, refused=True) or 1.0)
                        attempt += 1
                        continue
                await self._token_changed.wait()
                attempt = min(attempt, 1)  # a provider that keeps failing is backed off
            self._token_changed.clear()
            delay, opened_at = await self._one_connection(attempt)
            if delay is None:
                continue  # unauthorized (waits above) or closed
            if opened_at is not None and time.monotonic() - opened_at >= self.stable_after_s:
                attempt = 0  # it had been fine for a while: this is not a failing streak
            attempt += 1
            self.state = "waiting"
            await asyncio.sleep(delay)

    async def _one_connection(self, attempt: int) -> tuple[float | None, float | None]:
        """Connect, serve until the connection ends; the delay before the next attempt
        (None: do not schedule one) and when this one opened (None: it did not)."""
        self.state = "connecting"
        self.attempts += 1
        url = self.urls[next(self._url_turn) % len(self.urls)]
        try:
            conn = await AgoraClient.connect(
                url,
                self.token,
                self.encoding,
                use_header=self.use_header,
                timeout=self.request_timeout,
                on_frame=self._on_frame,
            )
        except InvalidStatus as exc:
            retry = exc.response.headers.get("Retry-After")
            retry_s = float(retry) if retry and retry.isdigit() else None
            log.info("refused by %s with %d", url, exc.response.status_code)
            return self.backoff.delay(None, attempt, retry_after_s=retry_s, refused=True), None
        except Closed as exc:
            self.last_close = exc.code
            if exc.code == 4001:
                self.state = "unauthorized"
                return None, None
            return self._next_delay(exc.code, attempt), None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.info("cannot connect to %s: %s", url, exc)
            return self.backoff.delay(None, attempt, refused=True), None
        opened_at = time.monotonic()
        self.conn = conn
        self.connects += 1
        self.state = "open"
        refresher = None
        if self.token_provider is not None:
            refresher = asyncio.create_task(self._keep_token(conn))
        try:
            await self._resubscribe(conn)
            self._ready.set()
            await conn.closed.wait()
        except (*LOST, TimeoutError, ServerError) as exc:
            log.info("resubscribe failed: %s", exc)
            await conn.close()
        finally:
            if refresher is not None:
                refresher.cancel()
            self._ready.clear()
            self.conn = None
            if self._drop is not None:
                self._drop.cancel()
                self._drop = None
        code = conn.close_code if conn.close_code is not None else ABNORMAL
        self.last_close = code
        if code == 4001:
            self.state = "unauthorized"
            return None, opened_at
        if self.state == "closed":
            return None, opened_at
        return self._next_delay(code, attempt), opened_at

    async def _keep_token(self, conn: AgoraClient) -> None:
        """Send a fresh token before the session's expires, for as long as `conn` lives."""
        assert self.token_provider is not None
        exp = conn.hello.get("exp")
        while isinstance(exp, (int, float)) and not conn.closed.is_set():
            left = exp - time.time()
            await asyncio.sleep(max(0.0, left - min(self.refresh_margin_s, left / 2)))
            try:
                token = await self.token_provider()
                reply = await conn.request({"t": "auth", "token": token}, self.request_timeout)
            except LOST:
                return  # the connection is gone; the next one starts its own refresher
            except Exception as exc:  # the provider or the server said no: try again soon
                log.warning("token refresh failed: %s", exc)
                await asyncio.sleep(min(5.0, max(0.5, (exp - time.time()) / 4)))
                continue
            self.token = token  # also for the next connection
            self.refreshes += 1
            exp = reply.get("exp")

    def _next_delay(self, code: int | None, attempt: int) -> float | None:
        if self._drain_at is not None:
            # A draining node said when to move; the server already spread us over time.
            wait = max(0.0, self._drain_at - time.monotonic())
            self._drain_at = None
            return wait
        return self.backoff.delay(code, attempt)

    async def _resubscribe(self, conn: AgoraClient) -> None:
        for conv, sub in list(self._subs.items()):
            try:
                await self._sub(conn, conv, sub)
            except ServerError as exc:
                if exc.code in ("forbidden", "not_found"):
                    self._subs.pop(conv, None)  # no longer ours to follow
                    await self.events.put({"t": "sub_lost", "conv": conv, "code": exc.code})
                else:
                    raise

    # -- inbound, in wire order ------------------------------------------------------------
    def _on_frame(self, frame: dict[str, Any]) -> bool:
        t = frame.get("t")
        if t == "msg":
            sub = self._subs.get(str(frame.get("conv")))
            if sub is not None:
                seq = frame.get("seq")
                if isinstance(seq, int):
                    if sub.last_seq is not None and seq <= sub.last_seq:
                        self.duplicates_dropped += 1
                        return True
                    if sub.last_seq is not None and seq > sub.last_seq + 1:
                        self._gap(str(frame["conv"]), sub.last_seq, seq)
                    sub.last_seq = seq
            self.events.put_nowait(frame)
            return True
        if t == "subbed":
            conv = str(frame.get("conv"))
            sub = self._subs.get(conv)
            seq = frame.get("seq")
            if sub is not None and isinstance(seq, int):
                since = sub.asked_since
                if since is not None and not frame.get("recovered") and seq > (sub.last_seq or 0):
                    self._gap(conv, sub.last_seq or 0, seq + 1)
                if sub.last_seq is None or seq > sub.last_seq:
                    sub.last_seq = seq
            return False  # still the reply to the `sub` request
        if t == "reconnect":
            after_ms = frame.get("after_ms")
            wait = after_ms / 1000 if isinstance(after_ms, int) and after_ms >= 0 else 0.0
            self._drain_at = time.monotonic() + wait
            self.drains += 1
            conn = self.conn
            if conn is not None and self._drop is None:
                # Move at that time even if the node has not closed us by then.
                self._drop = asyncio.get_running_loop().call_later(
                    wait, lambda: asyncio.ensure_future(conn.close())
                )
            self.events.put_nowait(frame)
            return True
        if t == "unsubbed":
            self._subs.pop(str(frame.get("conv")), None)  # not ours to follow any more
            self.events.put_nowait(frame)
            return True
        if t in ("typing", "score", "joined"):
            self.events.put_nowait(frame)
            return True
        return False

    def _gap(self, conv: str, after: int, before: int) -> None:
        self.events.put_nowait({"t": "gap", "conv": conv, "after": after, "before": before})

    # -- requests ----------------------------------------------------------------------------
    async def _connection(self, deadline: float) -> AgoraClient:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("not connected")
            await asyncio.wait_for(self._ready.wait(), remaining)
            if self.conn is not None and self._ready.is_set():
                return self.conn

    async def _sub(self, conn: AgoraClient, conv: str, sub: _Sub) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "sub", "conv": conv}
        sub.asked_since = sub.last_seq
        if sub.last_seq is not None:
            frame["since"] = sub.last_seq
        return await conn.request(frame, self.request_timeout)

    async def subscribe(self, conv: str, since: int | None = None) -> dict[str, Any]:
        """Follow `conv` from now on (or from `since`), across reconnects."""
        sub = self._subs.get(conv)
        if sub is None:
            sub = self._subs[conv] = _Sub(since)
        elif since is not None and (sub.last_seq is None or since > sub.last_seq):
            sub.last_seq = since
        conn = await self._connection(time.monotonic() + self.request_timeout)
        try:
            return await self._sub(conn, conv, sub)
        except ServerError:
            self._subs.pop(conv, None)
            raise

    async def unsubscribe(self, conv: str) -> None:
        self._subs.pop(conv, None)
        if self.conn is not None and self._ready.is_set():
            await self.conn.unsub(conv)

    def last_seq(self, conv: str) -> int | None:
        sub = self._subs.get(conv)
        return sub.last_seq if sub is not None else None

    async def send(
        self,
        conv: str,
        body: str,
        cid: str | None = None,
        kind: str | None = None,
        timeout: float = 60.0,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        """The `ack` of this message, retrying with the same cid across reconnects,
        `unavailable` and `rate_limited`, until `timeout`."""
        frame: dict[str, Any] = {"t": "send", "conv": conv, "cid": cid or uuid.uuid4().hex}
        frame["body"] = body
        if kind:
            frame["kind"] = kind
        if reply_to is not None:
            frame["reply_to"] = reply_to
        return await self.submit(frame, timeout)

    async def edit(
        self, conv: str, ref: str, body: str, cid: str | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Edit one's own message `ref` (retried with the same cid like `send`)."""
        frame = {"t": "edit", "conv": conv, "ref": ref, "body": body}
        return await self.submit({**frame, "cid": cid or uuid.uuid4().hex}, timeout)

    async def delete(
        self, conv: str, ref: str, cid: str | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Delete one's own message `ref` (a tombstone stays)."""
        frame = {"t": "delete", "conv": conv, "ref": ref}
        return await self.submit({**frame, "cid": cid or uuid.uuid4().hex}, timeout)

    async def react(
        self,
        conv: str,
        ref: str,
        emoji: str,
        remove: bool = False,
        cid: str | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Add (or take back) one's reaction `emoji` to message `ref`."""
        frame = {"t": "react", "conv": conv, "ref": ref, "emoji": emoji, "remove": remove}
        return await self.submit({**frame, "cid": cid or uuid.uuid4().hex}, timeout)

    async def submit(self, frame: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Any request carrying a `cid` (send, edit, delete, react): its `ack`, retrying
        with the same cid until `timeout`."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            conn = await self._connection(deadline)
            try:
                return await conn.request(frame, min(self.request_timeout, timeout))
            except ServerError as exc:
                if exc.code not in RETRIABLE_ERRORS:
                    raise
                retry_ms = exc.frame.get("retry_after_ms")
                wait = retry_ms / 1000 if isinstance(retry_ms, int) else None
            except (*LOST, TimeoutError):
                # The ack may have been lost with the connection: the same cid again is
                # safe, the server answers with the first message's id.
                wait = None
            attempt += 1
            if wait is None:
                wait = self.backoff.jitter(min(attempt, 4))
            if time.monotonic() + wait > deadline:
                raise TimeoutError(f"send {frame['cid']} not acknowledged within {timeout}s")
            await asyncio.sleep(wait)

    async def read(self, conv: str, seq: int) -> dict[str, Any]:
        """Move one's read pointer in `conv` to `seq` (forward only; repeating is safe)."""
        conn = await self._connection(time.monotonic() + self.request_timeout)
        return await conn.read(conv, seq)

    async def ping(self) -> dict[str, Any]:
        conn = await self._connection(time.monotonic() + self.request_timeout)
        return await conn.ping()

    async def typing(self, conv: str) -> None:
        if self.conn is not None and self._ready.is_set():
            await self.conn.typing(conv)

    async def next_event(self, t: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The next event (of type `t`, skipping others)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {t or 'event'} within {timeout}s")
            frame = await asyncio.wait_for(self.events.get(), remaining)
            if t is None or frame.get("t") == t:
                return frame


__all__ = ["Backoff", "ReconnectingClient"]
