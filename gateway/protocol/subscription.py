"""One connection's view of one conversation: exactly once, in seq order, no gaps.

Sans I/O. Live messages may overlap what recovery reads from storage, arrive twice (a
redelivered batch is published again) or, rarely, skip ahead (a gap). A subscription turns
that into a clean stream:

- RECOVERING: after `sub`, live messages are held while missed ones are read from storage
  (the client gets every missed message before `subbed`, and live ones after it);
- LIVE: seq = last + 1 goes out; seq <= last is a duplicate and is dropped; seq > last + 1
  is held and the subscription enters GAP;
- GAP: contiguous messages still go out; `gap()` tells the caller which range to fetch
  from storage (`fill`), and once nothing is held the subscription is LIVE again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from storage.models import Message

MAX_HELD = 10_000  # beyond this a subscription has fallen too far behind to hold more


class State(Enum):
    RECOVERING = 1
    LIVE = 2
    GAP = 3


@dataclass
class Subscription:
    conv: int
    last_seq: int  # the highest seq the client has
    state: State = State.RECOVERING
    held: dict[int, Message] = field(default_factory=dict)

    def on_live(self, m: Message) -> list[Message]:
        """A live message arrived: what to send now (maybe nothing)."""
        if m.seq <= self.last_seq:
            return []
        if self.state is State.LIVE and m.seq == self.last_seq + 1 and not self.held:
            self.last_seq = m.seq
            return [m]
        if len(self.held) < MAX_HELD:
            self.held.setdefault(m.seq, m)
        if self.state is State.RECOVERING:
            return []
        # Only seqs above last_seq are ever held here, so no stale sweep: constant time
        # per message however large the backlog.
        out = self._release_next()
        self.state = State.GAP if self.held else State.LIVE
        return out

    def gap(self) -> tuple[int, int] | None:
        """(after, before): the seqs missing before the held messages, if any are held."""
        if not self.held:
            return None
        return self.last_seq, min(self.held)

    def fill(self, missed: list[Message]) -> list[Message]:
        """Storage returned `missed` (ascending): merge with what is held and go live.
        Returns everything now sendable, in order."""
        for m in missed:
            if m.seq > self.last_seq:
                self.held.setdefault(m.seq, m)
        out = self._release()
        self.state = State.GAP if self.held else State.LIVE
        return out

    def skip_to(self, seq: int) -> list[Message]:
        """Jump ahead to `seq` without the messages before it (a fresh subscription, or a
        gap larger than the replay limit); returns held messages now sendable."""
        self.last_seq = max(self.last_seq, seq)
        return self.fill([])

    def _release(self) -> list[Message]:
        for s in [s for s in self.held if s <= self.last_seq]:
            del self.held[s]
        return self._release_next()

    def _release_next(self) -> list[Message]:
        out: list[Message] = []
        while self.last_seq + 1 in self.held:
            self.last_seq += 1
            out.append(self.held.pop(self.last_seq))
        return out
