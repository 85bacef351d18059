"""Signing keys and a JWKS endpoint on loopback for tests of AGORA_JWT_JWKS_URL.

`JwksServer` is a real HTTP server (http.server in a thread) serving whichever keys the test
publishes at the moment and counting its hits, so a test can rotate keys under a running
gateway and bound how often the gateway fetched.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

JWKS_PATH = "/.well-known/jwks.json"


def _ec_jwk(public: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """A P-256 public JWK with each coordinate the curve's full 32 bytes (RFC 7518
    6.2.1.2), as identity providers publish them. Not PyJWT's `ECAlgorithm.to_jwk`: before
    2.10 it drops a coordinate's leading zero bytes (1 key in ~128) while its `from_jwk`
    refuses such a key, so the lowest-versions run failed at random."""
    numbers = public.public_numbers()

    def coord(value: int) -> str:
        return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()

    return {"kty": "EC", "crv": "P-256", "x": coord(numbers.x), "y": coord(numbers.y)}


@dataclass
class SigningKey:
    kid: str
    alg: str  # RS256 or ES256
    private: Any = field(repr=False)

    @classmethod
    def new(cls, kid: str, alg: str = "RS256") -> SigningKey:
        if alg == "RS256":
            return cls(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        return cls(kid, alg, ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if self.alg == "RS256":
            data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(public))
        else:
            data = _ec_jwk(public)
        data.update(kid=self.kid, use="sig", alg=self.alg)
        return data

    def pyjwk(self) -> jwt.PyJWK:
        return jwt.PyJWK(self.jwk())

    def token(self, user: str, ttl: int = 3600, kid: str | None = None, **claims: Any) -> str:
        body: dict[str, Any] = {"sub": user, "exp": int(time.time()) + ttl, **claims}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": kid or self.kid})


class JwksServer:
    """Serves `{"keys": [...]}` of the published keys at JWKS_PATH; counts the requests."""

    def __init__(self) -> None:
        self.keys: list[SigningKey] = []
        self.hits = 0
        self.down = False  # answer 503 instead of the keys
        self.delay_s = 0.0  # wait this long before answering
        self.answered = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits += 1
                    down = server.down
                    delay = server.delay_s
                    body = json.dumps({"keys": [k.jwk() for k in server.keys]}).encode()
                time.sleep(delay)
                with server._lock:
                    server.answered += 1
                if self.path != JWKS_PATH or down:
                    self.send_response(404 if self.path != JWKS_PATH else 503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}{JWKS_PATH}"

    def publish(self, *keys: SigningKey) -> None:
        with self._lock:
            self.keys = list(keys)

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)
