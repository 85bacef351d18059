"""Row types returned by the data-access modules (plain, immutable, wire-agnostic)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    kind: str  # direct | group | thread
    title: str
    created_by: str
    created_at_ms: int
    members: tuple[str, ...]
    last_seq: int = 0
    last_activity_ms: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    conv: int
    id: int
    seq: int
    sender: str
    body: str
    ts: int
    cid: str
    kind: str  # text | comment, or an event: edit | delete | react | unreact
    ref: int | None = None  # an event's target message
    reply_to: int | None = None  # the message a text or comment answers
    edited: bool = False  # current state of a text or comment (history, replay)
    deleted: bool = False
    # Set where it is sequenced, never stored nor sent: whom to notify (user, kind), and
    # the other member of a direct conversation (a `dm` entry if they are offline).
    notify: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    dm_to: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message accepted by a gateway, not yet sequenced."""

    conv: int
    id: int
    sender: str
    cid: str
    body: str
    ts: int
    kind: str
    ref: int | None = None
    reply_to: int | None = None
