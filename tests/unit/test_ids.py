"""storage.ids: the 64-bit id layout, wire parsing, and the monotonic generator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.ids import (
    EPOCH_MS,
    MAX_ID,
    MAX_SAFE_ID,
    SEQ_MASK,
    SHARD_MASK,
    TIME_BITS,
    IdGenerator,
    IdParts,
    compose,
    decompose,
    is_valid_id,
    parse_id,
    shard_of_id,
)

LAST_MS = EPOCH_MS + (1 << TIME_BITS) - 1

valid_ms = st.integers(EPOCH_MS, LAST_MS)
valid_shard = st.integers(0, SHARD_MASK)
valid_seq = st.integers(0, SEQ_MASK)


def test_layout_is_64_bits() -> None:
    assert SHARD_MASK == 8191
    assert SEQ_MASK == 1023
    assert MAX_ID == (1 << 64) - 1
    assert compose(LAST_MS, SHARD_MASK, SEQ_MASK) == MAX_ID
    assert compose(EPOCH_MS, 0, 0) == 0


@given(valid_ms, valid_shard, valid_seq)
def test_compose_decompose_round_trip(ms: int, shard: int, seq: int) -> None:
    id_ = compose(ms, shard, seq)
    assert 0 <= id_ <= MAX_ID
    assert decompose(id_) == IdParts(ms=ms, shard=shard, seq=seq)


@given(st.integers(0, MAX_ID))
def test_decompose_compose_round_trip(id_: int) -> None:
    assert compose(*decompose(id_)) == id_


@given(valid_ms, valid_shard, valid_seq)
def test_shard_of_id_round_trip(ms: int, shard: int, seq: int) -> None:
    assert shard_of_id(compose(ms, shard, seq)) == shard


@given(
    st.tuples(valid_ms, valid_shard, valid_seq),
    st.tuples(valid_ms, valid_shard, valid_seq),
)
def test_ids_sort_by_time_first(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    if a[0] < b[0]:
        assert compose(*a) < compose(*b)
    elif a[0] > b[0]:
        assert compose(*a) > compose(*b)


@pytest.mark.parametrize(
    ("ms", "shard", "seq"),
    [
        (EPOCH_MS - 1, 0, 0),
        (LAST_MS + 1, 0, 0),
        (0, 0, 0),
        (EPOCH_MS, -1, 0),
        (EPOCH_MS, SHARD_MASK + 1, 0),
        (EPOCH_MS, 0, -1),
        (EPOCH_MS, 0, SEQ_MASK + 1),
    ],
)
def test_compose_rejects_out_of_range_parts(ms: int, shard: int, seq: int) -> None:
    with pytest.raises(ValueError):
        compose(ms, shard, seq)


@given(
    st.one_of(
        st.integers(max_value=EPOCH_MS - 1).map(lambda ms: (ms, 0, 0)),
        st.integers(min_value=LAST_MS + 1).map(lambda ms: (ms, 0, 0)),
        st.one_of(st.integers(max_value=-1), st.integers(min_value=SHARD_MASK + 1)).map(
            lambda s: (EPOCH_MS, s, 0)
        ),
        st.one_of(st.integers(max_value=-1), st.integers(min_value=SEQ_MASK + 1)).map(
            lambda q: (EPOCH_MS, 0, q)
        ),
    )
)
def test_compose_rejects_any_out_of_range_part(parts: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        compose(*parts)


# -- parse_id -----------------------------------------------------------------------------


@given(st.integers(1, MAX_SAFE_ID))
def test_parse_id_accepts_every_valid_id(id_: int) -> None:
    assert parse_id(str(id_)) == id_
    assert is_valid_id(id_)


@given(st.integers(1, MAX_SAFE_ID), st.integers(1, 18))
def test_parse_id_accepts_leading_zeros_up_to_19_chars(id_: int, zeros: int) -> None:
    text = "0" * zeros + str(id_)
    assert parse_id(text) == (id_ if len(text) <= 19 else None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "0000000000000000000",
        str(MAX_SAFE_ID + 1),
        str(MAX_ID),
        "99999999999999999999",
        "00000000000000000001",  # 20 chars, even though the value is fine
        "-1",
        "+1",
        " 1",
        "1 ",
        "1\n",
        "1.0",
        "1e3",
        "0x10",
        "1_000",
        "abc",
        "\u0661\u0662\u0663",  # Arabic-Indic digits: str.isdigit() is True for them
        "\u00b2",  # superscript two: isdigit() is True but int() raises
        "\uff11\uff12\uff13",  # fullwidth digits
    ],
)
def test_parse_id_rejects(text: str) -> None:
    assert parse_id(text) is None


@pytest.mark.parametrize("value", [None, 123, 12.0, b"123", ["1"]])
def test_parse_id_rejects_non_strings(value: object) -> None:
    assert parse_id(value) is None  # type: ignore[arg-type]


@given(st.text(max_size=25))
def test_parse_id_never_raises_and_only_accepts_ascii_digit_strings(text: str) -> None:
    result = parse_id(text)
    if result is not None:
        assert text.isascii() and text.isdigit() and len(text) <= 19
        assert 1 <= result <= MAX_SAFE_ID
        assert result == int(text)


@pytest.mark.parametrize(
    ("id_", "valid"), [(0, False), (-1, False), (1, True), (MAX_SAFE_ID, True), (1 << 63, False)]
)
def test_is_valid_id(id_: int, valid: bool) -> None:
    assert is_valid_id(id_) is valid


# -- IdGenerator --------------------------------------------------------------------------


def scripted_clock(readings: list[int]) -> Callable[[], int]:
    it: Iterator[int] = iter(readings)
    return lambda: next(it)


# A clock script: runs of (offset from a base ms, how many consecutive calls read it).
# Runs longer than 1024 exhaust a millisecond's sequence; negative steps go backwards.
clock_runs = st.lists(
    st.tuples(st.integers(-5_000, 5_000), st.integers(1, 1_200)), min_size=1, max_size=8
)


@given(clock_runs, valid_shard)
def test_generator_is_strictly_increasing_under_any_clock(
    runs: list[tuple[int, int]], shard: int
) -> None:
    base = 1_750_000_000_000
    readings = [base + offset for offset, count in runs for _ in range(count)]
    gen = IdGenerator(clock=scripted_clock(readings))
    out = [gen.next_id(shard) for _ in readings]
    assert all(a < b for a, b in pairwise(out))
    assert all(shard_of_id(i) == shard for i in out)
    # It never runs ahead of the clock by more than the sequence space forces it to.
    max_ms = max(decompose(i).ms for i in out)
    assert max_ms <= max(readings) + len(readings) // (SEQ_MASK + 1)


@given(clock_runs, st.lists(valid_shard, min_size=1, max_size=5))
def test_generator_is_monotonic_across_shards(
    runs: list[tuple[int, int]], shards: list[int]
) -> None:
    # One generator serves every shard: ordering by time then shard still never repeats a
    # (ms, seq) pair, so the ids of any one shard are strictly increasing and distinct.
    base = 1_750_000_000_000
    readings = [base + offset for offset, count in runs for _ in range(count)]
    gen = IdGenerator(clock=scripted_clock(readings))
    out = [gen.next_id(shards[i % len(shards)]) for i in range(len(readings))]
    parts = [decompose(i) for i in out]
    assert all((a.ms, a.seq) < (b.ms, b.seq) for a, b in pairwise(parts))


def test_generator_follows_a_forward_clock() -> None:
    gen = IdGenerator(
        clock=scripted_clock([1_750_000_000_000, 1_750_000_000_000, 1_750_000_000_007])
    )
    a, b, c = (decompose(gen.next_id(3)) for _ in range(3))
    assert a == IdParts(1_750_000_000_000, 3, 0)
    assert b == IdParts(1_750_000_000_000, 3, 1)
    assert c == IdParts(1_750_000_000_007, 3, 0)


def test_generator_default_clock_is_wall_time() -> None:
    import time

    before = time.time_ns() // 1_000_000
    ms = decompose(IdGenerator().next_id(0)).ms
    after = time.time_ns() // 1_000_000
    assert before <= ms <= after


class SteppingBackClock:
    """Advances 1 ms every `per_ms` reads; between reads `back_from` and `back_to` it reads
    `back_ms` earlier (an NTP step backwards that is later undone)."""

    def __init__(self, start: int, per_ms: int, back_from: int, back_to: int, back_ms: int):
        self.start, self.per_ms = start, per_ms
        self.back_from, self.back_to, self.back_ms = back_from, back_to, back_ms
        self.reads = 0

    def __call__(self) -> int:
        n = self.reads
        self.reads += 1
        ms = self.start + n // self.per_ms
        if self.back_from <= n < self.back_to:
            ms -= self.back_ms
        return ms


def test_million_ids_with_clock_stepping_back_have_no_duplicates() -> None:
    n = 1_000_000
    clock = SteppingBackClock(
        start=1_750_000_000_000, per_ms=700, back_from=300_000, back_to=700_000, back_ms=5_000
    )
    gen = IdGenerator(clock=clock)
    next_id = gen.next_id
    out = [next_id(42) for _ in range(n)]
    assert clock.reads == n
    assert len(set(out)) == n
    assert all(a < b for a, b in pairwise(out))
    # While the clock read 5 s behind, ids kept going from where they were, not from the clock.
    first_back = decompose(out[clock.back_from]).ms
    assert first_back >= decompose(out[clock.back_from - 1]).ms
    assert first_back > clock.start + clock.back_from // clock.per_ms - clock.back_ms
