"""The `msg` frame of a stored message (live, replayed, or as an HTTP history item)."""

from __future__ import annotations

from typing import Any

from gateway.protocol.frames import msg
from storage.models import Message


def message_frame(m: Message) -> dict[str, Any]:
    """The `msg` frame of a stored message (live, replayed or over HTTP)."""
    return msg(
        m.conv,
        m.id,
        m.seq,
        m.sender,
        m.body,
        m.ts,
        m.cid,
        m.kind,
        ref=m.ref,
        reply_to=m.reply_to,
        edited=m.edited,
        deleted=m.deleted,
    )
