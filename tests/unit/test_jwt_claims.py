"""`aud` and `iss`: checked only when AGORA_JWT_AUDIENCE / AGORA_JWT_ISSUER are set; and the
HMAC key checks PyJWT makes, still made with the key preparation kept (gateway/auth.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jwt
import pytest

from core.errors import ConfigError, Unauthorized
from core.settings import Settings
from gateway.auth import TokenVerifier, make_token

SECRET = "s" * 32


def verifier(**env: str) -> TokenVerifier:
    return TokenVerifier(Settings.from_env({"AGORA_JWT_SECRET": SECRET, **env}))


def token(**claims: object) -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, **claims}, SECRET)


def refusal(v: TokenVerifier, tok: str) -> str:
    with pytest.raises(Unauthorized) as err:
        v.verify(tok)
    return err.value.message


def test_unset_audience_and_issuer_are_not_checked() -> None:
    v = verifier()
    # Tokens from real issuers carry aud and iss: without a setting, any value passes.
    assert v.verify(token(aud="someone-else", iss="https://idp.example")).user == "alice"
    assert v.verify(token(aud=["a", "b"])).user == "alice"
    assert v.verify(token()).user == "alice"


def test_audience_must_be_present_and_match() -> None:
    v = verifier(AGORA_JWT_AUDIENCE="agora")
    assert v.verify(token(aud="agora")).user == "alice"
    assert v.verify(token(aud=["other", "agora"])).user == "alice"  # a list holding it
    assert refusal(v, token()) == "token has no aud claim"
    assert refusal(v, token(aud="other")) == "token aud is not this service's audience"
    assert refusal(v, token(aud=["other"])) == "token aud is not this service's audience"


def test_issuer_must_be_present_and_match_exactly() -> None:
    v = verifier(AGORA_JWT_ISSUER="https://idp.example/")
    assert v.verify(token(iss="https://idp.example/")).user == "alice"
    assert refusal(v, token()) == "token has no iss claim"
    assert refusal(v, token(iss="https://idp.example")) == "token iss is not the accepted issuer"
    assert refusal(v, token(iss="https://evil.example/")) == "token iss is not the accepted issuer"


def test_both_checked_together_and_tokens_made_for_them_pass() -> None:
    v = verifier(AGORA_JWT_AUDIENCE="agora", AGORA_JWT_ISSUER="me")
    assert refusal(v, token(aud="agora")) == "token has no iss claim"
    assert refusal(v, token(iss="me")) == "token has no aud claim"
    made = make_token(SECRET, "bob", None, 60, audience="agora", issuer="me")
    assert v.verify(made).user == "bob"
    assert refusal(v, make_token(SECRET, "bob", None, 60)) == "token has no aud claim"


def test_a_refused_token_is_not_remembered_and_other_claims_still_required() -> None:
    v = verifier(AGORA_JWT_AUDIENCE="agora")
    bad = token(aud="other")
    for _ in range(2):
        assert refusal(v, bad) == "token aud is not this service's audience"
    no_exp = jwt.encode({"sub": "alice", "aud": "agora"}, SECRET)
    assert refusal(v, no_exp) == "token has no exp claim"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"AGORA_JWT_JWKS_URL": "https://idp.example/jwks"}, "needs RS256 or ES256"),
        (
            {
                "AGORA_JWT_ALGORITHMS": "RS256",
                "AGORA_JWT_JWKS_URL": "https://idp.example/jwks",
                "AGORA_JWT_PUBLIC_KEY": "pem",
            },
            "not both",
        ),
        ({"AGORA_JWT_ALGORITHMS": "ES256"}, "AGORA_JWT_JWKS_URL is required"),
    ],
)
def test_key_settings_that_cannot_work_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        verifier(**env)


@pytest.mark.parametrize(
    "url",
    [
        "http://idp.example/jwks",
        "ftp://idp.example/jwks",
        "file:///etc/passwd",
        "idp/jwks",
        "http://127.0.0.1.evil.example/jwks",
    ],
)
def test_jwks_urls_must_be_https_or_loopback(url: str) -> None:
    with pytest.raises(ConfigError, match="AGORA_JWT_JWKS_URL"):
        Settings.from_env({"AGORA_JWT_JWKS_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example/.well-known/jwks.json",
        "https://idp.example:8443/k",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9/x",
    ],
)
def test_jwks_urls_accepted(url: str) -> None:
    assert Settings.from_env({"AGORA_JWT_JWKS_URL": url}).jwt_jwks_url == url


def test_agora_token_carries_the_configured_audience_and_issuer() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGORA_")},
        "AGORA_JWT_SECRET": SECRET,
        "AGORA_JWT_AUDIENCE": "agora",
        "AGORA_JWT_ISSUER": "me",
    }
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "token", "carol"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    v = verifier(AGORA_JWT_AUDIENCE="agora", AGORA_JWT_ISSUER="me")
    assert v.verify(out.stdout.strip()).user == "carol"


def test_an_exp_past_what_clients_and_encoders_hold_is_refused_not_raised() -> None:
    # JSON bounds no number: 10^400 made the float conversion raise OverflowError, and
    # 10^20 passed only to break the hello frame's encoders (64-bit) mid-upgrade.
    v = verifier()
    for exp in (10**400, 10**20, 2**64, 2**53):
        assert refusal(v, token(exp=exp)) == "token exp is out of range", exp
    far = 2**53 - 1  # the largest a JavaScript client reads exactly: still a valid token
    assert v.verify(token(exp=far)).exp == far


def _hs256(secret: bytes, claims: dict[str, object]) -> str:
    """An HS256 token signed by hand (PyJWT refuses to sign with a key that looks
    asymmetric)."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_the_kept_key_preparation_still_refuses_an_asymmetric_secret_every_time() -> None:
    """gateway/auth.py keeps PyJWT's HMAC key preparation per key: a secret that is a
    public key (algorithm confusion) must still be refused, on every token, not only the
    first; and a good secret's tokens still have their signatures checked."""
    pem = (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEexampleexampleexampleexampleexample\n"
        "-----END PUBLIC KEY-----\n"
    )
    v = TokenVerifier(Settings.from_env({"AGORA_JWT_SECRET": pem}))
    claims: dict[str, object] = {"sub": "alice", "exp": int(time.time()) + 60}
    for _ in range(3):
        assert refusal(v, _hs256(pem.encode(), claims)) == "token invalid: InvalidKeyError"
    good = verifier()
    assert good.verify(_hs256(SECRET.encode(), claims)).user == "alice"
    assert refusal(good, _hs256(b"t" * 32, {**claims, "sub": "bob"})).startswith("token invalid")
