"""A conversation's messages in their current state, built from `msg` frames.

Feed it every `msg` frame of one conversation in seq order (live or replayed by
`sub since`) and, optionally, a page of HTTP history first: texts and comments are
kept by id; `edit`, `delete`, `react` and `unreact` events change their target. Every
sequenced reaction event moves a count by exactly one (the server refuses the ones that
would change nothing), so counting them is exact. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVENT_KINDS = ("edit", "delete", "react", "unreact")


@dataclass
class Item:
    id: str
    seq: int
    sender: str
    body: str
    kind: str
    reply_to: str | None = None
    edited: bool = False
    deleted: bool = False
    reactions: dict[str, int] = field(default_factory=dict)
    mine: set[str] = field(default_factory=set)


class Timeline:
    def __init__(self, me: str) -> None:
        self.me = me
        self.items: dict[str, Item] = {}
        self.seq = 0  # the last seq applied: what to `sub since`

    def load_page(self, page: dict[str, Any]) -> None:
        """A page of `GET .../messages` (its `last_seq` is the state it reflects)."""
        for m in page["items"]:
            item = self._item(m)
            item.reactions = dict(m.get("reactions", {}))
            item.mine = set(m.get("my_reactions", ()))
        self.seq = max(self.seq, int(page.get("last_seq", 0)))

    def apply(self, frame: dict[str, Any]) -> None:
        """One `msg` frame; frames at or below the last applied seq are ignored."""
        if frame["seq"] <= self.seq:
            return
        self.seq = frame["seq"]
        if frame["kind"] not in EVENT_KINDS:
            self._item(frame)
            return
        target = self.items.get(frame["ref"])
        if target is None:
            return  # older than what this timeline holds
        kind = frame["kind"]
        if kind == "edit":
            target.body, target.edited = frame["body"], True
        elif kind == "delete":
            target.body, target.deleted = "", True
            target.reactions.clear()
            target.mine.clear()
        else:
            emoji, step = frame["body"], 1 if kind == "react" else -1
            count = target.reactions.get(emoji, 0) + step
            if count > 0:
                target.reactions[emoji] = count
            else:
                target.reactions.pop(emoji, None)
            if frame["from"] == self.me:
                (target.mine.add if step > 0 else target.mine.discard)(emoji)

    def _item(self, m: dict[str, Any]) -> Item:
        item = Item(
            id=m["id"],
            seq=m["seq"],
            sender=m["from"],
            body=m["body"],
            kind=m["kind"],
            reply_to=m.get("reply_to"),
            edited=bool(m.get("edited")),
            deleted=bool(m.get("deleted")),
        )
        self.items[item.id] = item
        return item

    def snapshot(self) -> dict[str, tuple[str, bool, bool, dict[str, int]]]:
        """{id: (body, edited, deleted, reactions)}: what two timelines compare on."""
        return {
            i: (it.body, it.edited, it.deleted, dict(it.reactions)) for i, it in self.items.items()
        }
