"""The error hierarchy shared by every layer.

Each error carries the docs/protocol.md code, the HTTP status it maps to, and whether the caller
may retry the same request later (`retriable`, as aiokafka's errors do). The gateway turns
them into `err` frames or HTTP error bodies; nothing else needs to know the mapping.
"""

from __future__ import annotations


class AgoraError(Exception):
    """Base class: a request failed with a docs/protocol.md error code."""

    code: str = "internal"
    status: int = 500
    retriable: bool = False

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class BadRequest(AgoraError):
    code = "bad_request"
    status = 400


class Unprocessable(BadRequest):
    """Well-formed JSON whose fields are wrong (HTTP 422, code `bad_request`)."""

    status = 422


class Unauthorized(AgoraError):
    code = "unauthorized"
    status = 401


class Forbidden(AgoraError):
    code = "forbidden"
    status = 403


class NotFound(AgoraError):
    code = "not_found"
    status = 404


class Conflict(AgoraError):
    code = "conflict"
    status = 409


class TooLarge(AgoraError):
    code = "too_large"
    status = 413


class RateLimited(AgoraError):
    code = "rate_limited"
    status = 429
    retriable = True


class Unavailable(AgoraError):
    """A dependency is down; nothing was accepted, so retrying the same request is safe."""

    code = "unavailable"
    status = 503
    retriable = True

    def __init__(self, message: str, *, retry_after_ms: int | None = 1000) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)


class ShardUnavailable(Unavailable):
    """One physical shard database cannot be reached; other shards keep working."""

    def __init__(
        self, shard_name: str, cause: BaseException | None = None, *, reason: str = ""
    ) -> None:
        detail = f": {reason or type(cause).__name__}" if cause is not None or reason else ""
        super().__init__(f"shard {shard_name} is unavailable{detail}")
        self.shard_name = shard_name


class Internal(AgoraError):
    code = "internal"
    status = 500


class ConfigError(Exception):
    """A setting has a bad value; raised at start-up and names the setting."""
