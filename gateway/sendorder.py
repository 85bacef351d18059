"""The produce order of one connection's pipelined sends.

A connection's sends are handled concurrently (access check, claim, shard read, waiting
for the broker's ack), but each hands its message to the producer only after the send
before it did, or ended without producing. The producer appends records to its batches in
the order `send()` is called and keeps one request in flight per partition, so a
client's messages to a conversation reach Kafka, and get their seqs, in the order it sent
them. Each send holds a `Turn`: it waits for the previous turn before producing and
releases its own once its record is appended (or it will not produce at all). A turn
released before the previous one (a send refused at once behind a slow one) counts as
released only when the previous one is: the sends after it wait for every earlier one.
"""

from __future__ import annotations

import asyncio


class Turn:
    """One send's place in its connection's produce order."""

    __slots__ = ("_before", "_done", "_let_go", "held")

    def __init__(self, before: Turn | None) -> None:
        # Only the previous turn's future is kept, not the turn: a long pipeline does not
        # keep a chain of finished turns alive.
        self._before = None if before is None or before.released else before._done
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._let_go = False  # release() was called (done may wait for the previous turn)
        # The send path took this turn over (it releases it when its attempt ends, even
        # if the request's own task is cancelled).
        self.held = False

    @property
    def released(self) -> bool:
        return self._done.done()

    def free(self) -> bool:
        """The previous send appended its record or ended without producing: `wait`
        would not wait (the send path then needs no timeout around it)."""
        before = self._before
        return before is None or before.done()

    async def wait(self) -> None:
        """Until the previous send appended its record or ended without producing."""
        before = self._before
        if before is not None and not before.done():
            # Not `await before`: a waiter cancelled (its timeout) must not cancel it.
            await asyncio.wait((before,))
        self._before = None

    def release(self) -> None:
        """This send appended its record, or will not produce: the next may go once the
        previous one has too. Idempotent."""
        if self._let_go:
            return
        self._let_go = True
        before = self._before
        self._before = None
        if before is not None and not before.done():
            before.add_done_callback(lambda _: self._finish())
        else:
            self._finish()

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def abandon(self) -> None:
        """The request ended: release the turn unless the send path holds it."""
        if not self.held:
            self.release()
