"""The loop both Kafka workers share: take records without trusting the fetch, hold what
cannot be applied yet, dead-letter what never can be, commit only what is done.

- **Continuity.** The topics are neither compacted nor transactional, so a partition's
  offsets are contiguous. The worker knows the next offset it expects per partition (from
  the committed offset when the partition is assigned); a fetched record past it, or a
  consumer position past it with no record (a skip at the end of a fetch), means the
  fetch skipped records (a broker bug seen in the dev broker), so the worker seeks back
  and fetches them again, and never commits past them.
- **Holding.** A record whose shard (or Redis, or the dead-letter topic) fails transiently
  is held and retried with capped exponential backoff per shard, while the other shards go
  on; records of a shard waiting out its backoff are held without being tried. A
  partition's committed offset stops at its oldest held record, so a worker that dies
  while holding loses nothing. Held records of partitions taken away by a rebalance are
  dropped: their new owner starts from the committed offset and gets them again.
- **Poison.** A record that can never be applied (an envelope that does not decode, a data
  error) is produced to the dead-letter topic; its offset is committed past only after
  that produce was acknowledged, else it is held like a transient failure.

The workers (`fanout.worker`, `fanout.scores`) say only how to decode a record, which shard
it needs and how to apply a batch (`HoldingWorker.decode`, `.hold_key`, `.apply_batch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from core.settings import Settings
from fanout.consumer import Committer
from fanout.deadletter import DeadLetters
from fanout.metrics import ConsumerMetrics, installed
from fanout.positions import position_now
from fanout.stall import StallWatch, set_fetch_wait, unread

T = TypeVar("T")
log = logging.getLogger("agora.fanout")

FIRST_RETRY_S = 0.1
COMMIT_FLUSH_S = 5.0  # longest wait for the last commits at a rebalance or a stop
DEAD_LETTER_KEY = "dead-letter topic"
# The hold key of a batch that failed in a way nobody classified (a bug): nothing is known
# of what its records need, so while it is held every new record waits behind it.
CATCH_ALL_KEY = "worker"


class _Offset(Protocol):
    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=_Offset)


class Continuity:
    """The next offset expected per partition (pure; the worker seeks on a skip)."""

    def __init__(self) -> None:
        self.expected: dict[TopicPartition, int] = {}

    def known(self, tp: TopicPartition) -> bool:
        return tp in self.expected

    def reset(self, tp: TopicPartition, offset: int) -> None:
        self.expected[tp] = offset

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self.expected.pop(tp, None)

    def take(self, tp: TopicPartition, records: Sequence[R]) -> tuple[list[R], int | None]:
        """The records that continue the partition, in order, and the offset to seek back
        to if the fetch skipped some (None when it did not). Records below the expected
        offset were taken already (a re-fetch) and are left out."""
        expected = self.expected[tp]
        taken: list[R] = []
        skipped: int | None = None
        for rec in records:
            if rec.offset < expected:
                continue
            if rec.offset > expected:
                skipped = expected
                break
            taken.append(rec)
            expected += 1
        self.expected[tp] = expected
        return taken, skipped


class Backoff:
    """Capped exponential backoff per key (a shard's name, a logical shard behind a move's
    fence, "redis", the DLQ). Pure."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self._delay: dict[str, float] = {}
        self._due: dict[str, float] = {}

    def due(self, key: str, now: float) -> bool:
        return self._due.get(key, 0.0) <= now

    def failing(self, key: str) -> bool:
        return key in self._delay

    def due_at(self, key: str) -> float:
        return self._due.get(key, 0.0)

    def failed(self, key: str, now: float) -> float:
        """Record a failure; returns how long `key` now waits."""
        delay = min(self.cap_s, self._delay[key] * 2) if key in self._delay else self.first_s
        self._delay[key] = delay
        self._due[key] = now + delay
        return delay

    def succeeded(self, key: str) -> bool:
        """Record a success; whether `key` was failing until now."""
        self._due.pop(key, None)
        return self._delay.pop(key, None) is not None


@dataclass(frozen=True, slots=True)
class Raw:
    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Record(Generic[T]):
    raw: Raw
    item: T
    hold: str  # the backoff key it waits on when held: its shard's name, "redis"...

    @property
    def tp(self) -> TopicPartition:
        return self.raw.tp

    @property
    def offset(self) -> int:
        return self.raw.offset


@dataclass
class Outcome(Generic[T]):
    """What `apply_batch` made of the records it was given; those in neither list are done."""

    held: list[Record[T]] = field(default_factory=list)  # with `hold` set to what failed
    poison: list[tuple[Record[T], str]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # hold key -> error


def fenced_key(logical: int) -> str:
    """The hold key of the records of a logical shard that a shard move's fence refused
    (storage/fence.py): one backoff per logical shard, apart from its database's, whose
    other shards go on."""
    return f"logical shard {logical} (fenced for a move)"


class PoisonRecord(ValueError):
    """Raised by `decode` or `hold_key` for a record that can never be applied."""


class HoldingWorker(Generic[T]):
    group = "worker"

    def __init__(
        self, settings: Settings, consumer: AIOKafkaConsumer, dead_letters: DeadLetters | None
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.stopping = asyncio.Event()
        self.held: list[Record[T]] = []  # oldest first per partition
        self.letters: list[tuple[Raw, str]] = []  # poison the dead-letter topic did not take
        self.continuity = Continuity()
        self.backoff = Backoff(FIRST_RETRY_S, settings.worker_retry_max_ms / 1000)
        self.generation = 0
        self.max_held = 50_000
        self.batches = 0
        self.done = 0
        self.dead_lettered = 0
        self.skips_healed = 0
        self.stalls = StallWatch(settings.kafka_fetch_wait_ms)
        self._wait_settable = True
        self.metrics: ConsumerMetrics | None = installed()
        self.commits = Committer(consumer, settings.worker_commit_interval_ms / 1000)
        if self.metrics is not None:
            self.metrics.fetch_wait.labels(self.group).set(settings.kafka_fetch_wait_ms)
        # Set after every batch: its child looked up once (`labels()` locks and hashes).
        self._held_gauge = None if self.metrics is None else self.metrics.held.labels(self.group)

    # -- what a worker says ----------------------------------------------------------------

    def decode(self, raw: Raw) -> T:
        raise NotImplementedError

    def hold_key(self, item: T) -> str:
        """The backoff key of the shard this item needs."""
        raise NotImplementedError

    async def apply_batch(self, work: list[Record[T]]) -> Outcome[T]:
        raise NotImplementedError

    # -- the loop --------------------------------------------------------------------------

    def listener(self) -> ConsumerRebalanceListener:
        return _Listener(self)

    def revoked(self, tps: Sequence[TopicPartition]) -> None:
        # A new assignment starts from the committed offsets: what was held or expected
        # under the old one is redelivered, so it is dropped (a batch still in flight sees
        # the generation change and keeps nothing of it).
        self.generation += 1
        self.commits.drop()
        self.continuity.forget(tps)
        self.stalls.forget(list(tps))
        self.held = []
        self.letters = []
        self._gauge()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            fetched = len(self.held) + len(self.letters) < self.max_held
            if not fetched:
                records: dict[TopicPartition, list[Any]] = {}
                await asyncio.sleep(self._until_due(loop.time()) or FIRST_RETRY_S)
            else:
                # With records held, come back when the first backoff ends even if no new
                # records arrive.
                wait = self._until_due(loop.time())
                timeout = 200 if wait is None else max(10, min(200, int(wait * 1000)))
                records = await self.consumer.getmany(
                    timeout_ms=timeout, max_records=self.settings.fanout_batch_max
                )
            # Held records whose backoff has not ended are left alone (no empty rounds).
            if records or self._until_due(loop.time()) == 0:
                await self.handle(records)
            # Not while full: the consumer is not asked, so nothing it has fetched moves.
            took = sum(len(recs) for recs in records.values())
            await self._check_positions(
                set(records) if fetched else None, took >= self.settings.fanout_batch_max
            )
        # What is done is committed before the consumer leaves the group.
        await self.commits.flush(COMMIT_FLUSH_S)

    def _until_due(self, now: float) -> float | None:
        keys = {r.hold for r in self.held} | ({DEAD_LETTER_KEY} if self.letters else set())
        due = [self.backoff.due_at(k) for k in keys]
        return max(0.0, min(due) - now) if due else None

    async def handle(self, records: dict[TopicPartition, list[Any]]) -> None:
        generation = self.generation
        fresh: list[Record[T]] = []
        letters = list(self.letters)
        # After an unclassified failure the held batch may hold records that were never
        # applied; a later record of one of their conversations applied first would take a
        # seq before them. So new records wait with it, unless their own key is failing
        # (then they wait with the earlier records of that key, as always).
        stalled = any(r.hold == CATCH_ALL_KEY for r in self.held)
        for tp, recs in records.items():
            for rec in await self._continuous(tp, recs):
                raw = Raw(tp, rec.offset, rec.key, rec.value)
                try:
                    item = self.decode(raw)
                    key = self.hold_key(item)
                except PoisonRecord as exc:
                    letters.append((raw, str(exc)))
                    continue
                if stalled and not self.backoff.failing(key):
                    key = CATCH_ALL_KEY
                fresh.append(Record(raw, item, key))
        now = asyncio.get_running_loop().time()
        due: list[Record[T]] = []
        waiting: list[Record[T]] = []
        for r in [*self.held, *fresh]:
            (due if self.backoff.due(r.hold, now) else waiting).append(r)
        outcome: Outcome[T] = Outcome()
        if due:
            try:
                outcome = await self.apply_batch(due)
            except Exception as exc:
                # A bug or a failure nobody classified: hold it all rather than lose it or
                # exit; the traceback says what to fix.
                log.exception("%s: batch of %d failed; holding it", self.group, len(due))
                outcome = Outcome(
                    held=[replace(r, hold=CATCH_ALL_KEY) for r in due],
                    failures={CATCH_ALL_KEY: repr(exc)},
                )
        letters += [(r.raw, why) for r, why in outcome.poison]
        unsent = await self._dead_letter_all(letters, outcome, now)
        self._backoff(due, outcome, now, bool(letters))
        if generation != self.generation:
            # Revoked while applying: the new owner redelivers; commit nothing, and expect
            # nothing of these partitions (if they come back, from their committed offset).
            self.continuity.forget(list(records))
            return
        self.held = sorted(waiting + outcome.held, key=lambda r: (r.tp.partition, r.offset))
        self.letters = unsent
        self._gauge()
        # Up to what was taken, on every owned partition (a record finished on a later
        # round, e.g. after its dead letter went through, is committed past then), never
        # past a held one.
        owned = self.consumer.assignment()
        taken = {tp: exp - 1 for tp, exp in self.continuity.expected.items() if tp in owned}
        floor = [(r.tp, r.offset) for r in self.held] + [(raw.tp, raw.offset) for raw, _ in unsent]
        self.commits.request(taken, floor)
        self.batches += 1
        self.done += len(due) - len(outcome.held)

    async def _dead_letter_all(
        self, letters: list[tuple[Raw, str]], outcome: Outcome[T], now: float
    ) -> list[tuple[Raw, str]]:
        """Produce the poison records to the dead-letter topic; returns those not taken
        (held until the topic works again, and never committed past)."""
        if not letters or not self.backoff.due(DEAD_LETTER_KEY, now):
            return letters
        unsent: list[tuple[Raw, str]] = []
        for i, (raw, why) in enumerate(letters):
            error = await self._dead_letter(raw, why)
            if error is not None:
                outcome.failures[DEAD_LETTER_KEY] = error
                unsent = letters[i:]
                break
        return unsent

    async def _continuous(self, tp: TopicPartition, recs: list[Any]) -> list[Any]:
        if not self.continuity.known(tp):
            try:
                start = await self.consumer.committed(tp)
                if start is None:
                    start = (await self.consumer.beginning_offsets([tp]))[tp]
            except KafkaError as exc:
                # Not knowing where the partition starts, take nothing of it: fetch it again.
                log.warning("%s: committed offset of %s unknown (%s)", self.group, tp, exc)
                self._seek(tp, recs[0].offset)
                return []
            self.continuity.reset(tp, start)
        taken, skipped = self.continuity.take(tp, recs)
        if skipped is not None:
            await self._heal(tp, skipped, recs[-1].offset)
        return taken

    async def _check_positions(self, got: set[TopicPartition] | None, full: bool) -> None:
        """A fetch whose skip is at its end (a batch that claims offsets past the records it
        carries, or carries none) moves the consumer's position past those offsets with no
        later record to show the gap: if nothing follows on that partition, its records
        would wait for the next one, or for ever. So the position is compared with what
        was taken, after every round (an in-memory read, not awaited). And with
        the high watermark of the last fetch answer, for fetches that stall (`fanout.stall`;
        `got`: the partitions that gave records this round, None when none was asked; `full`:
        the round took all it may, so the consumer may hold more)."""
        owned = self.consumer.assignment()
        behind: dict[TopicPartition, int] = {}
        for tp in owned:
            expected = self.continuity.expected.get(tp)
            high = self._highwater(tp)
            if expected is None and high is None:
                continue  # nothing fetched yet: nothing to check
            position = position_now(self.consumer, tp)  # from memory (fanout.positions)
            if position is None:
                continue  # revoked meanwhile, or no position yet: nothing fetched to check
            if high is not None:
                behind[tp] = high - position
            if expected is None or self.continuity.expected.get(tp) != expected:
                continue
            if position > expected:
                await self._heal(tp, expected, position - 1)
        # Read together, with no await between: a partition whose records came meanwhile
        # is in the consumer's buffer, not an empty answer.
        waiting = unread(self.consumer)
        if got is None or (waiting is None and full):
            self.stalls.unasked()
        else:
            self._watch_stalls(behind, got | (waiting or set()), self._polled(owned))

    def _highwater(self, tp: TopicPartition) -> int | None:
        """The high watermark of the last fetch answer; None when not known, or when a
        rebalance took the partition during this round's awaits (aiokafka asserts it)."""
        try:
            high: int | None = self.consumer.highwater(tp)
        except (AssertionError, IllegalStateError, KeyError):
            return None
        return high

    def _polled(self, owned: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """When each owned partition's last fetch answer came (aiokafka's clock, ms)."""
        polled: dict[TopicPartition, int | None] = {}
        for tp in owned:
            try:
                polled[tp] = self.consumer.last_poll_timestamp(tp)
            except (AssertionError, IllegalStateError, KeyError):
                continue  # revoked during this round's awaits
        return polled

    def _watch_stalls(
        self,
        behind: dict[TopicPartition, int],
        got: set[TopicPartition],
        polled: dict[TopicPartition, int | None],
    ) -> None:
        step = self.stalls.observe(asyncio.get_running_loop().time(), behind, got, polled)
        if step.started:
            if self.metrics is not None:
                self.metrics.fetch_stalls.labels(self.group).inc()
            log.warning(
                "%s: fetches of %s come back empty below the high watermark; "
                "fetch wait %d ms -> %d ms while it lasts",
                self.group,
                ", ".join(f"{s.tp} (lag {s.lag}, {s.seconds:.1f}s)" for s in step.started),
                self.stalls.setting_ms,
                step.wait_ms if step.wait_ms is not None else self.stalls.wait_ms,
            )
        if step.wait_ms is None or not self._wait_settable:
            return
        if not set_fetch_wait(self.consumer, step.wait_ms):
            self._wait_settable = False
            log.warning(
                "%s: this aiokafka's fetch wait cannot be changed; fetch stalls are only detected",
                self.group,
            )
            return
        if self.metrics is not None:
            self.metrics.fetch_wait.labels(self.group).set(step.wait_ms)
        if not step.started:
            log.info("%s: fetch wait now %d ms", self.group, step.wait_ms)

    async def _heal(self, tp: TopicPartition, expected: int, seen: int) -> None:
        try:
            start: int | None = (await self.consumer.beginning_offsets([tp]))[tp]
        except KafkaError:
            start = None
        if start is not None and start > expected:
            # Not a skip: retention removed them before they were taken (a worker stopped
            # longer than the topic keeps records). Nothing to fetch again; say so loudly.
            log.error(
                "%s: offsets %d..%d of %s are gone from the log (retention); going on at %d",
                self.group,
                expected,
                start - 1,
                tp,
                start,
            )
            expected = start
            self.continuity.reset(tp, start)
        else:
            self.skips_healed += 1
            if self.metrics is not None:
                self.metrics.skips_healed.labels(self.group).inc()
            log.warning(
                "%s: fetch of %s skipped from offset %d (got up to %d); fetching it again",
                self.group,
                tp,
                expected,
                seen,
            )
        self._seek(tp, expected)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        # A rebalance may have taken the partition meanwhile: its new owner reads it.
        with contextlib.suppress(IllegalStateError):
            self.consumer.seek(tp, offset)

    async def _dead_letter(self, raw: Raw, why: str) -> str | None:
        """Produce one poison record to the dead-letter topic; the error if that failed."""
        if self.dead_letters is None:
            return "no dead-letter topic"
        try:
            await self.dead_letters.send(raw.tp, raw.offset, raw.key, raw.value, why)
        except Exception as exc:
            return repr(exc)
        self.dead_lettered += 1
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(self.group).inc()
        log.error(
            "%s: record %s@%d dead-lettered to %s: %s",
            self.group,
            raw.tp,
            raw.offset,
            self.dead_letters.topic,
            why,
        )
        return None

    def _backoff(
        self, due: list[Record[T]], outcome: Outcome[T], now: float, lettered: bool
    ) -> None:
        for key, why in outcome.failures.items():
            delay = self.backoff.failed(key, now)
            count = sum(1 for r in outcome.held if r.hold == key)
            if self.metrics is not None:
                self.metrics.hold_faults.labels(self.group).inc()
            log.warning(
                "%s: %s failed (%s); %d records held, retry in %.1fs",
                self.group,
                key,
                why,
                count,
                delay,
            )
        tried = {r.hold for r in due} | ({DEAD_LETTER_KEY} if lettered else set())
        for key in tried - outcome.failures.keys():
            if self.backoff.succeeded(key):
                log.info("%s: %s works again", self.group, key)

    def _gauge(self) -> None:
        if self._held_gauge is not None:
            self._held_gauge.set(len(self.held) + len(self.letters))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: HoldingWorker[Any]) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Commit what is done while the partitions are still ours, so their next owner
        # does not redeliver it; bounded, since the group waits for this callback.
        await self.worker.commits.flush(COMMIT_FLUSH_S)
        self.worker.revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # Expected offsets start from the committed ones, read on the first fetch of each
        # partition (the revocation forgot the old ones).
        return None
