"""Ordering and de-duplication of one subscription, without I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.subscription import State, Subscription
from storage.models import Message


def m(seq: int) -> Message:
    return Message(1, 1000 + seq, seq, "u", f"b{seq}", 0, f"c{seq}", "text")


def seqs(msgs: list[Message]) -> list[int]:
    return [x.seq for x in msgs]


def test_live_in_order_passes_through_and_duplicates_drop() -> None:
    s = Subscription(1, last_seq=0, state=State.LIVE)
    assert seqs(s.on_live(m(1))) == [1]
    assert seqs(s.on_live(m(2))) == [2]
    assert s.on_live(m(2)) == [] and s.on_live(m(1)) == []
    assert s.last_seq == 2


def test_recovering_holds_live_then_merges_with_storage_without_overlap() -> None:
    s = Subscription(1, last_seq=3)
    assert s.on_live(m(6)) == [] and s.on_live(m(7)) == []
    out = s.fill([m(4), m(5), m(6)])  # storage overlaps the live 6
    assert seqs(out) == [4, 5, 6, 7]
    assert s.state is State.LIVE and s.held == {}


def test_gap_is_reported_and_filled() -> None:
    s = Subscription(1, last_seq=1, state=State.LIVE)
    assert s.on_live(m(4)) == []
    assert s.state is State.GAP and s.gap() == (1, 4)
    assert seqs(s.on_live(m(5))) == []
    assert seqs(s.fill([m(2), m(3)])) == [2, 3, 4, 5]
    assert s.gap() is None and s.state is State.LIVE


def test_skip_to_drops_older_held_and_releases_contiguous() -> None:
    s = Subscription(1, last_seq=0)
    s.on_live(m(9))
    s.on_live(m(11))
    assert seqs(s.skip_to(10)) == [11]
    assert s.last_seq == 11 and s.state is State.LIVE


@given(st.permutations(list(range(1, 31))), st.lists(st.integers(1, 30), max_size=20))
def test_any_arrival_order_with_duplicates_yields_each_seq_once_in_order(
    order: list[int], dups: list[int]
) -> None:
    s = Subscription(1, last_seq=0, state=State.LIVE)
    delivered: list[int] = []
    for seq in order + dups:
        delivered += seqs(s.on_live(m(seq)))
        assert (s.state is State.GAP) == bool(s.held)
    # Whatever is held is released once the gap closes; at the end nothing is missing.
    assert delivered == list(range(1, len(delivered) + 1))
    assert s.last_seq == 30 and s.held == {}
