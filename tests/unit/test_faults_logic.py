"""The pure parts of the workers' fault handling: what an error means (by SQLSTATE), which
fetched records continue a partition, per-shard backoff, restart waits, dead-letter bytes."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import pytest
from aiokafka import TopicPartition

from core.errors import ShardUnavailable
from fanout.deadletter import DeadLetter, decode, encode, preview
from fanout.envelope import EnvelopeError
from fanout.holding import Backoff, Continuity
from fanout.supervisor import FIRST_RESTART_S, HEALTHY_AFTER_S, restart_delay
from storage.pgerrors import IDEMPOTENCY_KEY, Fault, classify, describe, retryable, sqlstate


def pg(code: str, constraint: str | None = None) -> asyncpg.PostgresError:
    exc = asyncpg.PostgresError.new({"C": code, "M": f"error {code}", "n": constraint or ""})
    return exc


@pytest.mark.parametrize(
    "code",
    [
        "08006",  # connection failure
        "08003",  # connection does not exist
        "40001",  # serialization failure
        "40P01",  # deadlock
        "53100",  # disk full
        "53300",  # too many connections
        "57014",  # query canceled (statement_timeout)
        "57P01",  # admin shutdown
        "57P03",  # cannot connect now
        "25006",  # read-only transaction
        "55P03",  # lock not available (lock_timeout)
        "42P01",  # undefined table: a deployment bug, never the message's fault
        "XX000",  # internal error
    ],
)
def test_transient_sqlstates_hold(code: str) -> None:
    assert classify(pg(code)) is Fault.TRANSIENT


@pytest.mark.parametrize("code", ["22001", "22003", "22021", "22P02", "23514", "23502", "23503"])
def test_data_and_integrity_errors_are_poison(code: str) -> None:
    assert classify(pg(code)) is Fault.POISON


def test_the_idempotency_key_is_a_race_other_unique_keys_are_poison() -> None:
    assert classify(pg("23505", IDEMPOTENCY_KEY)) is Fault.RACE
    assert classify(pg("23505", "messages_pkey")) is Fault.POISON


@pytest.mark.parametrize("code", ["40001", "40P01", "40003", "55P03", "25006"])
def test_a_conflict_a_retry_gets_past_is_unavailable_to_the_client(code: str) -> None:
    answer = retryable(pg(code))
    assert answer is not None and answer.code == "unavailable" and answer.retriable
    assert code in answer.message


@pytest.mark.parametrize("code", ["22003", "23505", "42P01", "XX000", "08006"])
def test_other_database_errors_are_not_a_clients_retry(code: str) -> None:
    assert retryable(pg(code)) is None
    assert retryable(ValueError("no sqlstate")) is None


def test_the_exception_types_asyncpg_raises_map_by_their_sqlstate() -> None:
    assert classify(asyncpg.ReadOnlySQLTransactionError("ro")) is Fault.TRANSIENT
    assert classify(asyncpg.DeadlockDetectedError("dl")) is Fault.TRANSIENT
    assert classify(asyncpg.QueryCanceledError("qc")) is Fault.TRANSIENT
    assert classify(asyncpg.AdminShutdownError("as")) is Fault.TRANSIENT
    assert classify(asyncpg.CheckViolationError("cv")) is Fault.POISON
    assert classify(asyncpg.NumericValueOutOfRangeError("nv")) is Fault.POISON


@pytest.mark.parametrize(
    "exc",
    [
        OSError("refused"),
        ConnectionResetError(),
        TimeoutError(),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.ConnectionDoesNotExistError("gone"),
        ShardUnavailable("#1", OSError()),
        RuntimeError("nobody knows"),
    ],
)
def test_connection_pool_and_unknown_failures_hold(exc: BaseException) -> None:
    assert classify(exc) is Fault.TRANSIENT


def test_a_wrapped_database_error_keeps_its_sqlstate() -> None:
    try:
        try:
            raise asyncpg.CheckViolationError("bad kind")
        except asyncpg.PostgresError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert sqlstate(outer) == "23514"
        assert classify(outer) is Fault.POISON
    assert describe(asyncpg.CheckViolationError("bad kind")).startswith("23514 CheckViolation")


# -- continuity -------------------------------------------------------------------------------


@dataclass
class Rec:
    offset: int


TP = TopicPartition("t", 0)


def offsets(recs: list[Rec]) -> list[int]:
    return [r.offset for r in recs]


def test_contiguous_records_are_taken_and_advance_the_expected_offset() -> None:
    c = Continuity()
    c.reset(TP, 5)
    taken, skipped = c.take(TP, [Rec(5), Rec(6), Rec(7)])
    assert (offsets(taken), skipped, c.expected[TP]) == ([5, 6, 7], None, 8)


def test_a_skip_is_detected_and_nothing_past_it_is_taken() -> None:
    c = Continuity()
    c.reset(TP, 5)
    taken, skipped = c.take(TP, [Rec(7), Rec(8)])
    assert (offsets(taken), skipped, c.expected[TP]) == ([], 5, 5)
    # A gap inside a fetch: take up to it, seek back to it.
    taken, skipped = c.take(TP, [Rec(5), Rec(6), Rec(9)])
    assert (offsets(taken), skipped, c.expected[TP]) == ([5, 6], 7, 7)
    # The re-fetch from 7 continues.
    taken, skipped = c.take(TP, [Rec(7), Rec(8), Rec(9)])
    assert (offsets(taken), skipped, c.expected[TP]) == ([7, 8, 9], None, 10)


def test_redelivered_lower_offsets_are_ignored() -> None:
    c = Continuity()
    c.reset(TP, 10)
    taken, skipped = c.take(TP, [Rec(8), Rec(9), Rec(10), Rec(11)])
    assert (offsets(taken), skipped) == ([10, 11], None)
    assert c.take(TP, [Rec(11)]) == ([], None)


def test_assignment_resets_and_revocation_forgets() -> None:
    c = Continuity()
    other = TopicPartition("t", 1)
    c.reset(TP, 3)
    c.reset(other, 0)
    c.take(TP, [Rec(3), Rec(4)])
    c.forget([TP])
    assert not c.known(TP) and c.known(other)
    c.reset(TP, 4)  # the committed offset on the new assignment
    assert offsets(c.take(TP, [Rec(4)])[0]) == [4]


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_per_key_up_to_the_cap_and_resets_on_success() -> None:
    b = Backoff(0.1, 0.5)
    assert b.due("#0", 0.0) and not b.failing("#0")
    assert [b.failed("#0", 0.0) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert not b.due("#0", 0.4) and b.due("#0", 0.5)
    assert b.due("#1", 0.0)  # another shard is not held back
    assert b.succeeded("#0") and not b.succeeded("#0")
    assert b.failed("#0", 1.0) == 0.1


def test_restart_delay_doubles_for_a_child_that_keeps_dying_young() -> None:
    assert restart_delay(None, 1.0, 30) == FIRST_RESTART_S
    assert restart_delay(0.5, 1.0, 30) == 1.0
    assert restart_delay(16, 1.0, 30) == 30
    assert restart_delay(16, HEALTHY_AFTER_S, 30) == FIRST_RESTART_S


# -- dead letters -----------------------------------------------------------------------------


def test_a_dead_letter_round_trips_and_garbage_is_refused() -> None:
    d = DeadLetter("p.messages", 3, 17, b"42", b"\x81\xa1v\x01", "23514 CheckViolation", 1)
    assert decode(encode(d)) == d
    assert decode(encode(DeadLetter("t", 0, 0, None, b"", "e", 0))).key is None
    with pytest.raises(EnvelopeError):
        decode(b"\xc1 not msgpack")
    assert preview(b"\x81\xa1v\x01") == "{'v': 1}"
    assert preview(b"\xc1" * 200).endswith("...")
