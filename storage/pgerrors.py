"""What a database error means for the record that met it: wait, or never store it.

The workers must never drop an acked record because the database said no *now*. So the
question is not the exception's Python type but its SQLSTATE: only an error that says the
record itself can never be stored (a data exception, class 22, or an integrity violation
other than the messages' idempotency key) is poison. Everything else, known transient
classes and anything unrecognised alike, is treated like a shard that is down: the record
is held and retried, which costs latency but never loses it.
"""

from __future__ import annotations

import asyncio
import enum

import asyncpg

from core.errors import Unavailable

# The messages' (conv_id, sender, cid) key: a race between two workers storing the same
# message (the loser retries and finds it stored), never a property of the message.
IDEMPOTENCY_KEY = "messages_conv_id_sender_cid_key"

# What a shard move's fence raises for a row of a moving logical shard (storage/fence.py):
# a user-defined SQLSTATE. To a worker it is transient like any unknown code: the record
# waits for the switch.
FENCED = "AGF01"

# SQLSTATE classes (first two characters) and codes that are worth waiting out.
TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
TRANSIENT_CODES = frozenset({"25006", "55P03"})  # read-only transaction, lock timeout
POISON_CLASSES = frozenset({"22", "23"})


class Fault(enum.Enum):
    TRANSIENT = "transient"  # hold the record, retry with backoff
    RACE = "race"  # the idempotency key: retry at once (the record is stored already)
    POISON = "poison"  # the record can never be stored: dead-letter it


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of `exc` or of the database error that caused it, if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = getattr(cur, "sqlstate", None)
        if isinstance(code, str) and len(code) == 5:
            return code
        cur = cur.__cause__
    return None


def classify(exc: BaseException) -> Fault:
    """Transient, the idempotency race, or poison. Unknown errors are transient: holding a
    record that is in fact poison stalls one shard (visible in logs and metrics) while
    dead-lettering one that is not would take an acked message out of its conversation."""
    if isinstance(
        exc, Unavailable | OSError | asyncio.TimeoutError | TimeoutError | asyncpg.InterfaceError
    ):
        return Fault.TRANSIENT
    code = sqlstate(exc)
    if code is None:
        return Fault.TRANSIENT
    if code == "23505" and getattr(exc, "constraint_name", None) == IDEMPOTENCY_KEY:
        return Fault.RACE
    if code in TRANSIENT_CODES or code[:2] in TRANSIENT_CLASSES:
        return Fault.TRANSIENT
    if code[:2] in POISON_CLASSES:
        return Fault.POISON
    return Fault.TRANSIENT


# What a client may simply retry: its transaction lost a conflict (class 40: serialization
# failure, deadlock), waited too long for a lock (55P03) or met a database that is read-only
# for now (25006: a standby during a failover). Nothing of it was committed.
_RETRYABLE_CLASSES = frozenset({"40"})
_RETRYABLE_CODES = frozenset({"55P03", "25006"})


def retryable(exc: BaseException) -> Unavailable | None:
    """The `unavailable` answer for a database conflict a client's retry gets past, or
    None for any other error (a bug: the caller answers 500 and logs it)."""
    code = sqlstate(exc)
    if code is None or not (code[:2] in _RETRYABLE_CLASSES or code in _RETRYABLE_CODES):
        return None
    return Unavailable(f"the database refused this for now ({code}); retry")


def describe(exc: BaseException) -> str:
    """A one-line description for logs and dead-letter records: SQLSTATE, type, message."""
    code = sqlstate(exc)
    text = str(exc).splitlines()[0] if str(exc) else ""
    prefix = f"{code} " if code else ""
    return f"{prefix}{type(exc).__name__}: {text}"[:500]
