"""The fetch-stall bookkeeping (fanout.stall): when a partition counts as stalled, how the
wait climbs and comes back, and the one reach into aiokafka. The broker's side is in
tests/integration/test_worker_faults.py (a real Tansu that answers a long partition empty)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import Fetcher

from fanout.stall import StallWatch, Step, set_fetch_wait, unread

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


def rounds(
    watch: StallWatch,
    start: float,
    end: float,
    behind: dict[TopicPartition, int],
    got: frozenset[TopicPartition] = frozenset(),
) -> list[tuple[float, Step]]:
    """Observe a round every 100 ms from `start` to `end`, each alike."""
    steps: list[tuple[float, Step]] = []
    t = start
    while t <= end + 1e-9:
        steps.append((t, watch.observe(t, behind, set(got))))
        t = round(t + 0.1, 6)
    return steps


def test_a_partition_behind_with_no_records_stalls_after_the_bound_and_once_per_episode() -> None:
    w = StallWatch(20, after_s=1.5, rounds=3, calm_s=10, cap_ms=1000)
    steps = rounds(w, 0.0, 1.4, {A: 7, B: 0})
    assert all(not s.started and s.wait_ms is None for _, s in steps)
    _, first = rounds(w, 1.5, 1.5, {A: 7, B: 0})[0]
    assert [(s.tp, s.lag) for s in first.started] == [(A, 7)]
    assert first.wait_ms == 40 and w.episodes == 1
    # Still stalled: no second warning; the wait doubles every bound, up to the cap.
    later = rounds(w, 1.6, 12.0, {A: 7})
    assert not any(s.started for _, s in later)
    assert [s.wait_ms for _, s in later if s.wait_ms] == [80, 160, 320, 640, 1000]
    assert w.episodes == 1


def test_records_flowing_end_the_count_and_calm_restores_the_setting() -> None:
    w = StallWatch(20, after_s=1.5, rounds=3, calm_s=10, cap_ms=1000)
    rounds(w, 0.0, 1.5, {A: 7})
    assert w.wait_ms == 40
    # The longer wait works: records come; A is behind only by what each fetch brings.
    flowing = rounds(w, 1.6, 11.4, {A: 3}, frozenset({A}))
    assert all(s.wait_ms is None for _, s in flowing)
    _, back = rounds(w, 11.5, 11.5, {A: 3}, frozenset({A}))[0]
    assert back.wait_ms == 20 and not w.in_episode
    # It stalls again at 20 ms: the new episode starts at the wait that healed the last.
    _, again = rounds(w, 11.6, 13.1, {A: 9})[-1]
    assert again.started and again.wait_ms == 40 and w.episodes == 2
    # A broker that keeps stalling keeps the longer wait longer: twice the calm this time.
    rounds(w, 13.2, 32.9, {A: 3}, frozenset({A}))
    assert w.wait_ms == 40 and w.in_episode
    _, back = rounds(w, 33.0, 33.1, {A: 3}, frozenset({A}))[-1]
    assert back.wait_ms == 20 and not w.in_episode


def test_a_slow_round_is_no_stall_and_a_caught_up_partition_is_none() -> None:
    w = StallWatch(20, after_s=1.5, rounds=3)
    # Two rounds 5 s apart (a slow batch between them): behind, but only 2 empty rounds.
    assert not w.observe(0.0, {A: 4}, set()).started
    assert not w.observe(5.0, {A: 4}, set()).started
    # Caught up (lag 0) starts the count again.
    w.observe(5.1, {A: 0}, set())
    assert not w.observe(7.0, {A: 1}, set()).started
    # So does a round that did not ask the consumer (the worker held all it may).
    w.observe(7.1, {A: 1}, set())
    w.unasked()
    assert not w.observe(9.0, {A: 1}, set()).started
    assert w.episodes == 0


def test_the_setting_above_the_cap_is_the_cap() -> None:
    w = StallWatch(2000, after_s=1.0, rounds=1, cap_ms=1000)
    assert not w.observe(0.0, {A: 1}, set()).started
    step = w.observe(1.0, {A: 1}, set())
    assert step.started and w.episodes == 1
    assert step.wait_ms is None and w.wait_ms == 2000  # detected; nothing to raise


async def test_the_fetch_wait_of_a_running_consumer_changes_in_its_fetcher() -> None:
    # Checked against this aiokafka's Fetcher (scripts/lowest-test: its floor's too).
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=20)
    assert not set_fetch_wait(consumer, 40)  # not started: no fetcher yet
    fetcher = Fetcher(consumer._client, consumer._subscription, fetch_max_wait_ms=20)
    try:
        consumer._fetcher = fetcher
        assert set_fetch_wait(consumer, 40)
        assert fetcher._fetch_max_wait_ms == 40
    finally:
        consumer._fetcher = None
        await fetcher.close()
        await consumer._client.close()


def test_a_round_counts_only_for_a_partition_a_fetch_answered_since_the_last() -> None:
    w = StallWatch(20, after_s=1.5, rounds=3)
    # An answer brought A's records (ts 1000); then no answer for 3 s (the next fetch in
    # flight, or not sent yet): A is behind with no record, but nothing says the broker
    # answered it empty. No stall.
    assert not w.observe(0.0, {A: 200}, {A}, {A: 1000}).started
    for i in range(1, 30):
        assert not w.observe(i * 0.1, {A: 200}, set(), {A: 1000}).started
    # Answers that keep coming back empty do count, from the first of them on.
    steps = [w.observe(round(3 + i * 0.1, 6), {A: 200}, set(), {A: 2000 + i}) for i in range(16)]
    assert [i for i, s in enumerate(steps) if s.started] == [15]
    assert w.episodes == 1


def test_records_still_in_the_consumers_buffer_are_records() -> None:
    w = StallWatch(20, after_s=1.5, rounds=3)
    # Answered every round, but the answer's records are not handed out yet (`got` holds
    # what the consumer has fetched and not handed out, fanout.stall.unread).
    for i in range(30):
        assert not w.observe(i * 0.1, {A: 50}, {A}, {A: i}).started
    assert w.episodes == 0


async def test_the_records_a_consumer_holds_are_read_from_its_fetcher() -> None:
    # Checked against this aiokafka's Fetcher (scripts/lowest-test: its floor's too).
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
    assert unread(consumer) is None  # not started: no fetcher yet
    fetcher = Fetcher(consumer._client, consumer._subscription)
    try:
        consumer._fetcher = fetcher
        assert unread(consumer) == set()
        fetcher._records[B] = object()  # what an answer with records leaves there
        assert unread(consumer) == {B}
    finally:
        consumer._fetcher = None
        await fetcher.close()
        await consumer._client.close()
