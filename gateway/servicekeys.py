"""Service keys: the credential of a backend service that publishes (not a user's JWT).

A key is `<name>.<random>`, sent as `Authorization: ApiKey <key>`. The gateway keeps only
its SHA-256 (AGORA_SERVICE_KEYS), compares in constant time, and grants what the key's
scopes name: `conv:<id>` / `conv:*` to post into conversations, `user:<id>` / `user:*` to
post to a user (into the direct conversation of the service and that user). A service
posts as `service/<name>`: a `/` is not allowed in a user id, so no user can be it.

Make a key: `python -m gateway.servicekeys NAME [SCOPES]` prints the key (give it to the
service) and the settings entry (give it to the gateways).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass

from core.errors import Forbidden, Unauthorized
from core.settings import ServiceKey
from gateway.protocol.frames import SERVICE_SENDER

SENDER_PREFIX = SERVICE_SENDER


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    scopes: tuple[str, ...]

    @property
    def sender(self) -> str:
        return SENDER_PREFIX + self.name

    def allow_conversation(self, conv: int) -> None:
        if "conv:*" not in self.scopes and f"conv:{conv}" not in self.scopes:
            raise Forbidden(f"service {self.name} may not publish to conversation {conv}")

    def allow_user(self, user: str) -> None:
        if "user:*" not in self.scopes and f"user:{user}" not in self.scopes:
            raise Forbidden(f"service {self.name} may not publish to user {user}")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ServiceKeys:
    def __init__(self, configured: tuple[ServiceKey, ...]) -> None:
        self._by_name = {name: (hashed, scopes) for name, hashed, scopes in configured}

    def verify(self, authorization: str | None) -> Service:
        """The service an `Authorization: ApiKey <key>` header proves; Unauthorized else."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "apikey" or not key:
            raise Unauthorized("a service key is required: Authorization: ApiKey <key>")
        name = key.partition(".")[0]
        known = self._by_name.get(name)
        # Compared even for an unknown name, so timing does not tell which names exist.
        expected = known[0] if known else "0" * 64
        if not hmac.compare_digest(digest(key), expected) or known is None:
            raise Unauthorized("unknown or wrong service key")
        return Service(name, known[1])


def new_key(name: str, scopes: str = "conv:*") -> tuple[str, str]:
    """(a new key, its AGORA_SERVICE_KEYS entry)."""
    key = f"{name}.{secrets.token_urlsafe(32)}"
    return key, f"{name}:{digest(key)}:{scopes}"


if __name__ == "__main__":  # pragma: no cover - a tiny operator tool
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m gateway.servicekeys NAME [SCOPES, e.g. conv:*,user:*]")
    made, entry = new_key(args[0], args[1] if len(args) > 1 else "conv:*")
    print(f"key (give to the service):  {made}")
    print(f"AGORA_SERVICE_KEYS entry:   {entry}")
