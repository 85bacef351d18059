"""Field checks shared by the frame parser and the HTTP API (pure): each says why a value
is not acceptable, or None."""

from __future__ import annotations

from typing import Any

from core.errors import AgoraError, BadRequest, TooLarge

MAX_BODY_CHARS = 4000
MAX_CID_CHARS = 64
MAX_EMOJI_CHARS = 32


def check_cid(cid: Any) -> str | None:
    """Why `cid` is not a client message id (None: it is one). Shared with HTTP."""
    if not isinstance(cid, str) or not 1 <= len(cid) <= MAX_CID_CHARS or "\x00" in cid:
        return f"cid must be a string of 1-{MAX_CID_CHARS} chars"
    return None


def check_body(body: Any) -> AgoraError | None:
    """Why `body` is not a message text (None: it is one). Shared with HTTP."""
    if not isinstance(body, str):
        return BadRequest("body must be a string")
    if "\x00" in body:
        # PostgreSQL text cannot hold NUL: refuse it here, not in a fan-out worker later.
        return BadRequest("body must not contain NUL characters")
    if not body:
        return BadRequest("body must not be empty")
    if len(body) > MAX_BODY_CHARS:
        return TooLarge(f"body is over {MAX_BODY_CHARS} chars")
    return None


def check_emoji(emoji: Any) -> str | None:
    """Why `emoji` is not a reaction (None: it is one): 1-32 chars, no whitespace or
    control characters (so it is one visible token). Shared with HTTP."""
    if (
        not isinstance(emoji, str)
        or not 1 <= len(emoji) <= MAX_EMOJI_CHARS
        or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in emoji)
    ):
        return f"emoji must be 1-{MAX_EMOJI_CHARS} chars without spaces or control characters"
    return None
