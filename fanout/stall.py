"""Fetch stalls: a partition behind its high watermark whose fetches keep coming back empty.

Seen on the dev broker (bench/RESULTS.md, "Verification ... soak"): Tansu 0.6 reads a
memory-only partition's whole log on each fetch; once that takes longer than the fetch's
wait it answers the partition empty, with no error and the right high watermark, at any
offset, for ever. The worker then delivers nothing of that partition and nothing says so
but the lag gauge: acked messages that are never stored. The same wait answered with
records at once when it was 200 ms instead of 20.

So the worker compares, after every fetch round, each owned partition's high watermark
(from the last fetch answer) with its position (both in memory: no request), and counts
how long a partition behind has had no record. Past `STALL_AFTER_S` (and `STALL_ROUNDS`
rounds, so one slow batch is no stall) it is stalled: one WARNING per episode, a counter,
and the fetch wait doubled, again every `STALL_AFTER_S` while any partition stays stalled,
up to `WAIT_CAP_MS`. Once no partition has stalled for `CALM_S`, the wait goes back to the
setting. A broker that needs the longer wait again stalls again: the next episode starts
at the wait that healed the last one, so it costs one step instead of a ladder, and the
calm it takes to go back doubles with each episode (up to `CALM_MAX_S`): a broker that
keeps stalling keeps the longer wait instead of stalling (1.5 s of a partition's
deliveries, and a WARNING) every minute.

What counts as an empty answer. A partition behind with no record is not always a broker
answering empty: a slow or busy worker catching up has every partition's records fetched
into aiokafka's buffer, and `getmany(max_records=...)` hands them out one partition after
another (the buffer is drained in the order the answers came), so a partition can wait
there, behind its high watermark (from the answer that filled the buffer), for seconds and
many rounds; the fetcher does not fetch it again meanwhile. Nor is a fetch still in flight
an empty answer. So a round counts for a partition only when a fetch answer for it came
back since the last round (`last_poll_timestamp`, public: set on every answer without an
error) and the consumer holds none of its records (`unread`: handed out this round or still
buffered count as records). Without that the false alarm was real
(tests/integration/test_worker_faults.py, "slow worker with a backlog": 4 partitions x 200
records, batches of 25 taking 0.15 s: an episode, partitions 2 and 3 at lag 200). Should a
later aiokafka hide its buffer, a round that took `max_records` (the buffer may hold more)
says nothing of the broker and starts the counts again: a real stall is then noticed once
the worker has caught up, not during the catch-up.

`StallWatch` is the pure bookkeeping; `set_fetch_wait` and `unread` are the places that
reach into aiokafka's privates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

log = logging.getLogger("agora.fanout")

STALL_AFTER_S = 1.5  # ~75 fetches of the dev stack's 20 ms wait; 3 of production's 500 ms
STALL_ROUNDS = 3
CALM_S = 60.0
CALM_MAX_S = 1800.0
WAIT_CAP_MS = 1000


@dataclass(frozen=True, slots=True)
class Stalled:
    tp: TopicPartition
    lag: int
    seconds: float


@dataclass
class Step:
    """What a round of observation asks of the worker."""

    started: list[Stalled] = field(default_factory=list)  # a new episode: these stalled
    wait_ms: int | None = None  # set the fetch wait to this


class StallWatch:
    def __init__(
        self,
        setting_ms: int,
        *,
        after_s: float = STALL_AFTER_S,
        rounds: int = STALL_ROUNDS,
        calm_s: float = CALM_S,
        calm_max_s: float = CALM_MAX_S,
        cap_ms: int = WAIT_CAP_MS,
    ) -> None:
        self.setting_ms = setting_ms
        self.wait_ms = setting_ms
        self.after_s, self.rounds = after_s, rounds
        self.calm_s, self._calm_first_s, self._calm_max_s = calm_s, calm_s, calm_max_s
        self.cap_ms = max(cap_ms, setting_ms)
        self.episodes = 0
        self.in_episode = False
        # Per partition behind with no record: since when, and for how many answered rounds.
        self._empty: dict[TopicPartition, tuple[float, int]] = {}
        self._polled: dict[TopicPartition, int] = {}  # the last answer's timestamp seen
        self._stepped_at = 0.0
        self._last_stalled = 0.0
        self._healed_ms: int | None = None  # the wait that ended the last episode

    def observe(
        self,
        now: float,
        behind: dict[TopicPartition, int],
        got: set[TopicPartition],
        polled: dict[TopicPartition, int | None] | None = None,
    ) -> Step:
        """One fetch round: `behind` maps each owned partition whose high watermark is known
        to high watermark minus position; `got` are the partitions that gave records (handed
        out, or fetched and still in the consumer's buffer); `polled` the timestamp of each
        partition's last fetch answer (None: every round counts as answered)."""
        for tp in list(self._empty):
            if tp in got or behind.get(tp, 0) <= 0:
                del self._empty[tp]
        answered = self._answered(polled)
        stalled: list[Stalled] = []
        for tp, lag in behind.items():
            if lag <= 0 or tp in got:
                continue
            if answered is not None and tp not in answered:
                # No answer since the last round: a fetch in flight, or not sent while the
                # consumer still holds the partition's records. Nothing said about the broker.
                continue
            since, rounds = self._empty.get(tp, (now, 0))
            rounds += 1
            self._empty[tp] = (since, rounds)
            if now - since >= self.after_s and rounds >= self.rounds:
                stalled.append(Stalled(tp, lag, now - since))
        step = Step()
        if stalled:
            self._last_stalled = now
            if not self.in_episode:
                self.in_episode = True
                self.episodes += 1
                if self.episodes > 1:
                    self.calm_s = min(self._calm_max_s, self.calm_s * 2)
                step.started = stalled
                start = min(self.cap_ms, max(self._healed_ms or 0, self._doubled(self.setting_ms)))
                if start != self.wait_ms:  # a setting at the cap: detected, not changed
                    step.wait_ms = self._set(start, now)
            elif now - self._stepped_at >= self.after_s and self.wait_ms < self.cap_ms:
                step.wait_ms = self._set(self._doubled(self.wait_ms), now)
        elif self.in_episode and now - self._last_stalled >= self.calm_s:
            self.in_episode = False
            self._healed_ms = self.wait_ms
            if self.wait_ms != self.setting_ms:
                step.wait_ms = self._set(self.setting_ms, now)
        return step

    def unasked(self) -> None:
        """A round that says nothing of the broker: it did not ask the consumer (the worker
        holds all it may), or the consumer may still hold records it did not hand out and
        they cannot be seen. The partitions' counts start again."""
        self._empty.clear()

    def forget(self, tps: list[TopicPartition]) -> None:
        """Partitions revoked: their new owner watches them."""
        for tp in tps:
            self._empty.pop(tp, None)
            self._polled.pop(tp, None)

    def _answered(
        self, polled: dict[TopicPartition, int | None] | None
    ) -> set[TopicPartition] | None:
        """The partitions whose last answer is newer than at the last round."""
        if polled is None:
            return None
        fresh: set[TopicPartition] = set()
        for tp, at in polled.items():
            if at is not None and self._polled.get(tp) != at:
                fresh.add(tp)
                self._polled[tp] = at
        return fresh

    def _doubled(self, ms: int) -> int:
        return min(self.cap_ms, ms * 2)

    def _set(self, ms: int, now: float) -> int:
        self.wait_ms = ms
        self._stepped_at = now
        return ms


def set_fetch_wait(consumer: Any, ms: int) -> bool:
    """Change a running consumer's fetch wait; False when this aiokafka does not allow it.

    aiokafka (0.11 to 0.14 at least) has no public way: the wait is a constructor argument,
    and its Fetcher reads `_fetch_max_wait_ms` each time it builds a FetchRequest, so
    setting that private attribute takes effect from the next fetch. Should a later
    aiokafka rename it, the stall is still detected and logged, only not healed."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not isinstance(getattr(fetcher, "_fetch_max_wait_ms", None), int):
        return False
    fetcher._fetch_max_wait_ms = ms
    return True


def unread(consumer: Any) -> set[TopicPartition] | None:
    """The partitions whose fetched records the consumer holds and has not handed out (or
    an error it will raise for them); None when this aiokafka's fetcher cannot be read.

    aiokafka (0.11 to 0.14 at least) keeps them in its Fetcher's private `_records`, keyed
    by partition, an entry dropped once all its records were handed out; no public way."""
    fetcher = getattr(consumer, "_fetcher", None)
    records = getattr(fetcher, "_records", None)
    if not isinstance(records, dict):
        return None
    return set(records)
