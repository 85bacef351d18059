"""JWT verification: who is this connection or request?

Accepted algorithms come from settings; the key is chosen by the token's algorithm (a
secret for HS*; for RS256/ES256 the public key, or the key of the JWKS whose `kid` the
token names, see gateway/jwks.py), so an RS256 public key can never be used as an HMAC
secret. `alg: none` is never in the accepted list. When AGORA_JWT_AUDIENCE or
AGORA_JWT_ISSUER is set, a token must carry that `aud` or `iss`; when not, neither is
checked.

A client sends the same token with every HTTP request, so verified tokens are remembered
(by their exact text, whose signature was checked) until they expire: a repeat costs a
dict lookup instead of a signature check. Only successes are remembered, each no longer
than its own `exp` (plus the leeway decode allows, AGORA_JWT_LEEWAY_S), and at most
VERIFIED_CACHE of them. They are all forgotten when a JWKS fetch drops a key, so a key
taken out of the set stops verifying the tokens it signed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.api_jws import PyJWS

from core.errors import ConfigError, Unauthorized
from core.settings import EXAMPLE_JWT_SECRET, MIN_HS_SECRET_BYTES, Settings
from gateway.jwks import JwksKeys
from gateway.protocol.frames import MAX_TOKEN_CHARS, USER_ID

VERIFIED_CACHE = 10_000  # tokens remembered per process (the oldest go first)
HEADERS_CACHE = 64  # distinct token headers remembered (an issuer uses one or a few)
# The largest `exp` accepted: 2^53 - 1 s, the largest integer a JavaScript client reads
# exactly (in `hello.exp`). Larger ones (10^20, 10^400: JSON has no bound) made the float
# conversion below, or the hello frame's encoders (orjson and msgpack stop at 64 bits),
# raise during the WebSocket upgrade, after which the client waited forever.
MAX_EXP = 2**53 - 1


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    name: str
    exp: int = 0  # the token's `exp` claim (s since the epoch); valid until exp + leeway


class _PreparedHMAC(HMACAlgorithm):
    """PyJWT's HMAC with the key's preparation done once per key instead of per token.

    `HMACAlgorithm.prepare_key` refuses asymmetric keys used as HMAC secrets (PEM, SSH,
    DER, JSON: a guard against algorithm confusion) by trying to parse the key each time:
    two DER loads that raise and a JSON parse, ~30 % of a token's verification and ~6 % of
    a connection storm's gateway CPU (bench/RESULTS.md, issue 14, "Connects"). The answer
    depends on the key alone, and the key is the configured secret: kept per key (a few),
    refusals not kept (they raise again, as before)."""

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._prepared: dict[str | bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)
            if len(self._prepared) >= 8:
                self._prepared.clear()
            self._prepared[key] = prepared
        return prepared


def _decoder() -> jwt.PyJWT:
    """A PyJWT of our own (the module's global one is left as it is) whose HS* keys are
    prepared once (`_PreparedHMAC`). PyJWT before 2.11 verifies through the module's one
    shared PyJWS instead of one per PyJWT: there the decoder is returned as it is (each
    token's key is prepared again, as PyJWT does), rather than changing that shared one."""
    decoder = jwt.PyJWT()
    jws = getattr(decoder, "_jws", None)
    if not isinstance(jws, PyJWS):
        return decoder
    for name, hash_alg in (
        ("HS256", HMACAlgorithm.SHA256),
        ("HS384", HMACAlgorithm.SHA384),
        ("HS512", HMACAlgorithm.SHA512),
    ):
        jws.unregister_algorithm(name)
        jws.register_algorithm(name, _PreparedHMAC(hash_alg))
    return decoder


class TokenVerifier:
    def __init__(self, settings: Settings, *, prefetch: bool = True) -> None:
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
        if settings.jwt_public_key and settings.jwt_jwks_url:
            raise ConfigError("set AGORA_JWT_PUBLIC_KEY or AGORA_JWT_JWKS_URL, not both")
        if self._public and not (settings.jwt_public_key or settings.jwt_jwks_url):
            raise ConfigError(
                "AGORA_JWT_PUBLIC_KEY or AGORA_JWT_JWKS_URL is required for RS256/ES256"
            )
        if settings.jwt_jwks_url and not self._public:
            raise ConfigError("AGORA_JWT_JWKS_URL needs RS256 or ES256 in AGORA_JWT_ALGORITHMS")
        self.leeway_s = settings.jwt_leeway_s
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self._require = ["exp", "sub"] + [
            claim for claim, want in (("aud", self.audience), ("iss", self.issuer)) if want
        ]
        self._secret = settings.jwt_secret
        self._public_key = settings.jwt_public_key
        self.jwks: JwksKeys | None = None
        if settings.jwt_jwks_url:
            self.jwks = JwksKeys(
                settings.jwt_jwks_url,
                self._public,
                settings.jwt_jwks_lifespan_s,
                settings.jwt_jwks_min_refetch_s,
            )
            if prefetch:
                self.jwks.refresh()  # in a thread: the keys are there by the first token
        self._jwks_generation = 0
        self._verified: dict[str, tuple[Identity, float]] = {}  # token -> (who, valid until)
        self._jwt = _decoder()
        # A token's header segment -> its parsed header: tokens of one issuer share it, and
        # parsing it again per token (base64 and JSON) was ~5 % of a storm's gateway CPU.
        # Only what the header says is kept, never a verdict on a token: the signature and
        # claims of every token are checked by `decode`.
        self._headers: dict[str, dict[str, Any]] = {}

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise Unauthorized("token missing")
        jwks = self.jwks
        if jwks is not None:
            # Remembered tokens too keep the set fresh, so a withdrawn key is noticed.
            jwks.check_age()
            if jwks.generation != self._jwks_generation:
                self._jwks_generation = jwks.generation
                self._verified.clear()  # a key was withdrawn: check every token again
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
        header = self._header(token)
        alg = header.get("alg")
        key: str | jwt.PyJWK
        if alg in self._hmac:
            key = self._secret
        elif alg in self._public:
            key = self._public_key if self.jwks is None else self._jwks_key(header, alg)
        else:
            raise Unauthorized(f"token algorithm {str(alg)[:16]!r} is not accepted")
        try:
            claims = self._jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"require": self._require, "verify_aud": bool(self.audience)},
                audience=self.audience or None,
                issuer=self.issuer or None,
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token has no {exc.claim} claim") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token aud is not this service's audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token iss is not the accepted issuer") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token invalid: {type(exc).__name__}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not USER_ID.match(sub):
            raise Unauthorized("token sub is not a valid user id")
        name = claims.get("name")
        # `exp` is a number once decode accepted it (it checks the type and the time).
        exp = int(claims["exp"])
        if exp > MAX_EXP:
            raise Unauthorized("token exp is out of range")
        until = float(claims["exp"]) + self.leeway_s
        return Identity(sub, name[:100] if isinstance(name, str) else sub, exp), until

    def _header(self, token: str) -> dict[str, Any]:
        """The token's header, unverified (what `jwt.get_unverified_header` answers)."""
        segment = token.partition(".")[0]
        header = self._headers.get(segment)
        if header is not None:
            return header
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("token is malformed") from None
        if len(self._headers) >= HEADERS_CACHE:
            self._headers.clear()  # many distinct headers: not one issuer's, keep few
        self._headers[segment] = header
        return header

    def _jwks_key(self, header: dict[str, object], alg: str) -> jwt.PyJWK:
        assert self.jwks is not None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token has no kid: RS256/ES256 keys come from a key set")
        key = self.jwks.key(kid)
        if key is None:
            if not self.jwks.loaded:
                raise Unauthorized("signing keys are not available yet")
            raise Unauthorized(f"token kid {kid[:40]!r} is not a known signing key")
        if key.algorithm_name != alg:
            raise Unauthorized(f"token kid {kid[:40]!r} is a key for another algorithm")
        return key


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <jwt>` header, if that is what it is."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def make_token(
    secret: str,
    user: str,
    name: str | None,
    ttl_s: int,
    alg: str = "HS256",
    *,
    audience: str = "",
    issuer: str = "",
) -> str:
    """A signed token for development and tests (`agora token`)."""
    claims: dict[str, object] = {"sub": user, "exp": int(time.time()) + ttl_s}
    if name:
        claims["name"] = name
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=alg)
