"""What the send path knows about a `cid` (pure): its Redis record and the Redis epoch.

A record is `state|ms|n|conv`: state `p` (pending: an attempt is producing it), `a` (acked)
or `f` (failed: may still reach the broker, so a retry produces the very same message
again); `ms`, `n` and `conv` are the parts of the message id (`storage.ids.compose`).

The epoch (`RedisKeys.epoch`, `<created ms>-<token>`) is made once, with no TTL, by the
claim script. A new value means Redis lost its data, idempotency records included. A
retry whose record was lost is looked up on the shard, but its first copy may still be
on its way through Kafka, not yet stored: an id minted now would be dropped by the
(conv, sender, cid) key and the client told an id that never exists. So while an epoch
is young (or just changed under us), a send whose shard lookup finds nothing waits until
its own copy is stored and answers with what the shard holds. Once one such send on a
(partition, physical shard) has seen its copy stored, every record that went into that
partition for that shard before it has been processed (the fan-out stores a shard's
records of a partition in offset order), so later sends there take the normal path.
"""

from __future__ import annotations

from dataclasses import dataclass

STATES = ("p", "a", "f")


@dataclass(frozen=True, slots=True)
class Record:
    state: str
    ms: int
    n: int
    conv: int

    def value(self, state: str | None = None) -> str:
        """The record's Redis value, optionally in another state."""
        return f"{state or self.state}|{self.ms}|{self.n}|{self.conv}"


def parse_record(raw: str) -> Record:
    """Parse a record value; ValueError if it is not one (never from Agora's own script)."""
    parts = raw.split("|")
    if len(parts) != 4 or parts[0] not in STATES:
        raise ValueError(f"not an idempotency record: {raw!r}")
    return Record(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))


def epoch_created_ms(epoch: str) -> int | None:
    """The creation time written into an epoch value, or None if it carries none."""
    head, sep, _token = epoch.partition("-")
    if not sep or not head.isdigit():
        return None
    return int(head)


class EpochWatch:
    """Decides, per (partition, physical shard), whether a send whose shard lookup found
    nothing must wait for its copy to be stored before answering."""

    def __init__(self, horizon_ms: int) -> None:
        # How long after Redis lost its data a copy produced before the loss may still be
        # unstored, at most (the idempotency window: a retry of such a copy comes within it).
        self.horizon_ms = horizon_ms
        self.epoch: str | None = None
        self._until = 0
        self._cleared: set[tuple[int, int]] = set()
        # Bumped by every pair `clear` proves: a send whose shard read went out before a
        # proof cannot lean on it (its read may predate the copy the proof covers).
        self.proofs = 0

    def observe(self, epoch: str, now_ms: int) -> bool:
        """Note the epoch a claim returned; True when it differs from the last one seen."""
        if epoch == self.epoch:
            return False
        first = self.epoch is None
        self.epoch = epoch
        self._cleared = set()
        created = epoch_created_ms(epoch)
        if first and created is not None:
            # A node that starts does not know what happened before: a young epoch means
            # Redis lost its data recently (or this deployment is new).
            self._until = created + self.horizon_ms
        else:
            self._until = now_ms + self.horizon_ms
        return True

    def suspect(self, partition: int, physical: int, now_ms: int) -> bool:
        return now_ms < self._until and (partition, physical) not in self._cleared

    def clear(self, epoch: str | None, partition: int, physical: int) -> None:
        """A send made under `epoch` saw its copy stored: the rest of the pair is proven."""
        if epoch is not None and epoch == self.epoch and (partition, physical) not in self._cleared:
            self._cleared.add((partition, physical))
            self.proofs += 1
