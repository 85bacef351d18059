"""The publish API from a backend service (docs/protocol.md, "Publish API"): standard
library only, synchronous (call it from a thread in asyncio code).

    pub = Publisher("https://chat.example", key)
    pub.to_conversation(conv, "invoice ready", cid="invoice-123")
    pub.to_user("alice", "welcome aboard")

A `cid` makes a retry safe (the same message, the same id); one is made when omitted.
Errors raise `PublishError` with the service's error code and HTTP status.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any


class PublishError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class Publisher:
    def __init__(self, base_url: str, key: str, timeout: float = 10.0) -> None:
        self.base = base_url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def to_conversation(self, conv: str, body: str, cid: str | None = None) -> dict[str, Any]:
        """Post into conversation `conv`: {id, ts, conv}."""
        return self._post(f"/v1/publish/conversations/{urllib.parse.quote(conv)}", body, cid)

    def to_user(self, user: str, body: str, cid: str | None = None) -> dict[str, Any]:
        """Post to `user`, in their direct conversation with this service: {id, ts, conv}."""
        return self._post(f"/v1/publish/users/{urllib.parse.quote(user)}", body, cid)

    def _post(self, path: str, body: str, cid: str | None) -> dict[str, Any]:
        data = json.dumps({"cid": cid or uuid.uuid4().hex, "body": body}).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method="POST",
            headers={"Authorization": f"ApiKey {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
                return answer
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "internal", "message": exc.reason}
            raise PublishError(exc.code, error["code"], error["message"]) from None
