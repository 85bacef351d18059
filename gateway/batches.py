"""Fire-and-forget Redis work of many connections, sent as a few bounded pipelines.

A mass disconnect (a network blip, a load balancer restarting) ends thousands of
connections at once. One Redis task per connection queued thousands of commands on the
request pool ("No connection available"), and each one that failed was dropped: a session
count stayed over-counted for up to a day. Here jobs are keyed (jobs of one key merge into
one: a user's decrements add up), wait while a batch is in flight, and go out together in
the next one, at most `max_batch` keys a batch. No timer: a lone job goes out at once, and
under load the batches grow with the jobs that arrive while one is in flight (the same
rule as gateway/coalesce.py on the read side); unless the user asks for a `linger_s`, which
every batch then waits before it goes out. A batch that fails is put back ahead of the
newer jobs and retried after a backoff that doubles up to `retry_max_s`: while Redis
answers at all, no job is dropped.

Redis gone for long: the jobs wait in memory, at most one per key (one per user that
left), and are retried every `retry_max_s`, one warning each time; they go out when Redis
answers again. If the process ends first they are lost, which each user of this module
says the consequences of.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from core.tasks import stop_task

log = logging.getLogger("agora.gateway")

K = TypeVar("K")
V = TypeVar("V")

MAX_BATCH = 1000  # keys a pipeline: a few ms of Redis time, far below the command timeout
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0
STOP_RECANCEL_S = 0.1  # how long `stop` waits for the cancelled batch before cancelling again


class Pending(Generic[K, V]):
    """The jobs waiting, merged by key, taken oldest first (pure: no I/O, no loop)."""

    def __init__(self, merge: Callable[[V, V], V]) -> None:
        self._merge = merge
        self._jobs: dict[K, V] = {}  # insertion order: the oldest first

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, key: K) -> V | None:
        return self._jobs.get(key)

    def add(self, key: K, value: V) -> None:
        if key in self._jobs:
            self._jobs[key] = self._merge(self._jobs[key], value)
        else:
            self._jobs[key] = value

    def take(self, limit: int) -> dict[K, V]:
        """Up to `limit` jobs, the oldest first; they are no longer pending."""
        batch = dict(itertools.islice(self._jobs.items(), max(1, limit)))
        for key in batch:
            del self._jobs[key]
        return batch

    def put_back(self, batch: dict[K, V]) -> None:
        """A failed batch: pending again, ahead of the jobs added since (merged with them)."""
        newer, self._jobs = self._jobs, dict(batch)
        for key, value in newer.items():
            self.add(key, value)


class Backoff:
    """Delays between retries: `first_s`, doubling up to `max_s`; back to `first_s` once
    a try succeeds (pure)."""

    def __init__(self, first_s: float = RETRY_FIRST_S, max_s: float = RETRY_MAX_S) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._next = first_s
        self.streak = 0  # failures since the last success

    def failed(self) -> float:
        """The delay before the next try."""
        delay = self._next
        self._next = min(self.max_s, self._next * 2)
        self.streak += 1
        return delay

    def succeeded(self) -> None:
        self._next = self.first_s
        self.streak = 0


class Batcher(Generic[K, V]):
    """Sends `Pending` jobs with `flush(batch)`, one batch in flight at a time."""

    def __init__(
        self,
        what: str,
        flush: Callable[[dict[K, V]], Awaitable[None]],
        merge: Callable[[V, V], V],
        max_batch: int = MAX_BATCH,
        backoff: Backoff | None = None,
        linger_s: float = 0.0,
    ) -> None:
        """`what`: the jobs, for the log ("session count decrements"). `linger_s`: how long
        a batch waits for more jobs before it goes out (0: none), for jobs nobody waits on
        whose batches cost more than their Redis call (presence: a PostgreSQL read per
        shard per batch)."""
        self.what = what
        self.linger_s = linger_s
        self._flush = flush
        self.pending: Pending[K, V] = Pending(merge)
        self.max_batch = max_batch
        self.backoff = backoff or Backoff()
        self._task: asyncio.Task[None] | None = None  # held: a task nobody holds may vanish
        self._idle = asyncio.Event()
        self._idle.set()
        self.batches = 0  # batches sent (jobs / batches = the batch size)
        self.jobs = 0
        self.failures = 0

    def add(self, key: K, value: V) -> None:
        """Queue a job (from a callback: nothing is awaited); it goes out at once when no
        batch is in flight, else with the next batch."""
        self.pending.add(key, value)
        if self._task is None:
            self._idle.clear()
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.pending:
                if self.linger_s > 0:
                    await asyncio.sleep(self.linger_s)
                batch = self.pending.take(self.max_batch)
                try:
                    await self._flush(batch)
                except asyncio.CancelledError:
                    self.pending.put_back(batch)
                    raise
                except Exception as exc:
                    self.pending.put_back(batch)
                    self.failures += 1
                    delay = self.backoff.failed()
                    # The first failure, then about once per retry_max_s while it lasts.
                    if self.backoff.streak == 1 or delay >= self.backoff.max_s:
                        log.warning(
                            "%d %s not sent (%s: %s); retrying in %.2f s",
                            len(self.pending),
                            self.what,
                            type(exc).__name__,
                            exc,
                            delay,
                        )
                    await asyncio.sleep(delay)
                    continue
                if self.backoff.streak:
                    log.info("%s sent again after %d failures", self.what, self.backoff.streak)
                self.backoff.succeeded()
                self.batches += 1
                self.jobs += len(batch)
        finally:
            self._task = None
            self._idle.set()

    async def idle(self) -> None:
        """Return once nothing is pending or in flight (tests, shutdown)."""
        await self._idle.wait()

    async def stop(self, timeout: float = 2.0) -> None:
        """Give what is pending `timeout` seconds to go out, then stop trying."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), timeout)
        # Cancelled again until it ends (core/tasks.py: a cancellation can be lost).
        await stop_task(self._task, STOP_RECANCEL_S)
