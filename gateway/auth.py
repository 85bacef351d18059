"""JWT verification: who is this connection or request?

Accepted algorithms come from settings; the key is chosen by the token's algorithm (a
secret for HS*, the public key for RS256/ES256), so an RS256 public key can never be used
as an HMAC secret. `alg: none` is never in the accepted list.

A client sends the same token with every HTTP request, so verified tokens are remembered
(by their exact text, whose signature was checked) until they expire: a repeat costs a
dict lookup instead of a signature check. Only successes are remembered, each no longer
than its own `exp` (plus the leeway decode allows, AGORA_JWT_LEEWAY_S), and at most
VERIFIED_CACHE of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from gateway.protocol.frames import MAX_TOKEN_CHARS, USER_ID
from storage.errors import ConfigError, Unauthorized
from storage.settings import EXAMPLE_JWT_SECRET, MIN_HS_SECRET_BYTES, Settings

VERIFIED_CACHE = 10_000  # tokens remembered per process (the oldest go first)


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    name: str
    exp: int = 0  # the token's `exp` claim (s since the epoch); valid until exp + leeway


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self.algorithms = list(settings.jwt_algorithms)
        self._hmac = [a for a in self.algorithms if a.startswith("HS")]
        self._public = [a for a in self.algorithms if not a.startswith("HS")]
        if self._hmac and not settings.jwt_secret:
            raise ConfigError("AGORA_JWT_SECRET is required when AGORA_JWT_ALGORITHMS has HS*")
        weak = settings.jwt_secret == EXAMPLE_JWT_SECRET or (
            len(settings.jwt_secret.encode()) < MIN_HS_SECRET_BYTES
        )
        if self._hmac and weak and not settings.dev_tokens:
            # Anyone who knows (or can guess) the secret can sign a token for any user.
            raise ConfigError(
                "AGORA_JWT_SECRET is the published example or shorter than "
                f"{MIN_HS_SECRET_BYTES} bytes: set a random one (openssl rand -hex 32); "
                "weak secrets are accepted only in dev mode (AGORA_DEV_TOKENS=true, loopback)"
            )
        if self._public and not settings.jwt_public_key:
            raise ConfigError("AGORA_JWT_PUBLIC_KEY is required for RS256/ES256")
        self.leeway_s = settings.jwt_leeway_s
        self._secret = settings.jwt_secret
        self._public_key = settings.jwt_public_key
        self._verified: dict[str, tuple[Identity, float]] = {}  # token -> (who, valid until)

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise Unauthorized("token missing")
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]  # expired: decode below says so
        who, until = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (who, until)
        return who

    def _decode(self, token: str) -> tuple[Identity, float]:
        """The identity in a token and the time until which it is valid; Unauthorized if
        it is not valid now."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("token too long")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise Unauthorized("token is malformed") from None
        if alg in self._hmac:
            key = self._secret
        elif alg in self._public:
            key = self._public_key
        else:
            raise Unauthorized(f"token algorithm {str(alg)[:16]!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"require": ["exp", "sub"]},
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token invalid: {type(exc).__name__}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not USER_ID.match(sub):
            raise Unauthorized("token sub is not a valid user id")
        name = claims.get("name")
        # `exp` is a number once decode accepted it (it checks the type and the time).
        exp = int(claims["exp"])
        until = float(claims["exp"]) + self.leeway_s
        return Identity(sub, name[:100] if isinstance(name, str) else sub, exp), until


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <jwt>` header, if that is what it is."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def make_token(secret: str, user: str, name: str | None, ttl_s: int, alg: str = "HS256") -> str:
    """A signed token for development and tests (`agora token`)."""
    import time

    claims: dict[str, object] = {"sub": user, "exp": int(time.time()) + ttl_s}
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm=alg)
