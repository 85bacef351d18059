"""Verification keys from a JWKS endpoint (AGORA_JWT_JWKS_URL), chosen by a token's `kid`.

Tokens are verified synchronously on the event loop (the WebSocket handshake, every HTTP
request), and PyJWKClient fetches with blocking urllib, so the two never meet: `key()`
only reads the key set in memory, and when that set is missing the `kid`, or is older
than its lifespan, it starts one fetch in a worker thread and answers with what it has.
The new set replaces the old one in a single assignment once it has been parsed.

Fetches are rate limited per process, whatever asks for them: at most one at a time and
one per `min_refetch_s`. A flood of tokens with made-up `kid`s therefore costs the JWKS
endpoint one request per interval, and so does an endpoint that is down, while the keys
fetched before it went down go on verifying. The price: the first tokens signed with a
key the gateway has not fetched yet are refused until the fetch they triggered lands;
issuers publish a key before they sign with it, which the lifespan refresh picks up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from jwt import PyJWK, PyJWKClient

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 5.0  # a fetch runs in its own thread; this only bounds how long it is stuck

Fetch = Callable[[], list[PyJWK]]
Spawn = Callable[[Callable[[], None]], None]


def client_fetch(url: str) -> Fetch:
    """Fetch and parse the signing keys (`use` sig or unset, with a `kid`) at `url`."""
    # Our own cache and rate limit decide when to fetch; the client's are off.
    client = PyJWKClient(url, cache_jwk_set=False, timeout=FETCH_TIMEOUT_S)

    def fetch() -> list[PyJWK]:
        return client.get_signing_keys(refresh=True)

    return fetch


def in_thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="jwks-fetch", daemon=True).start()


class JwksKeys:
    """The current key set of one JWKS endpoint, refreshed in the background."""

    def __init__(
        self,
        url: str,
        algorithms: Collection[str],
        lifespan_s: float,
        min_refetch_s: float,
        *,
        fetch: Fetch | None = None,
        spawn: Spawn = in_thread,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.algorithms = frozenset(algorithms)
        self.lifespan_s = lifespan_s
        self.min_refetch_s = min_refetch_s
        self._fetch = fetch or client_fetch(url)
        self._spawn = spawn
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None  # of the last successful fetch
        self._started_at = -float("inf")  # of the last fetch started, successful or not
        self._running = False
        self._lock = threading.Lock()
        self.fetches = 0  # started
        self.failures = 0
        # Bumped when a fetch drops a kid: tokens verified with that key must be checked
        # again (TokenVerifier forgets the tokens it remembered).
        self.generation = 0

    @property
    def loaded(self) -> bool:
        return self._fetched_at is not None

    def key(self, kid: str) -> PyJWK | None:
        """The key with this `kid`, if the current set has it. Never blocks: an unknown
        `kid` or an old set starts a fetch (when the rate limit allows) for later calls."""
        found = self._keys.get(kid)
        if found is None:
            self.refresh()
        else:
            self.check_age()
        return found

    def check_age(self) -> None:
        """Start a fetch (rate limited) if the set is older than its lifespan, or none
        was ever fetched: cheap enough for every request."""
        fetched = self._fetched_at
        if fetched is None or self._clock() - fetched >= self.lifespan_s:
            self.refresh()

    def refresh(self) -> bool:
        """Start a fetch unless one is running or one started less than min_refetch_s ago.
        True if one was started."""
        now = self._clock()
        with self._lock:
            if self._running or now - self._started_at < self.min_refetch_s:
                return False
            self._running = True
            self._started_at = now
            self.fetches += 1
        try:
            self._spawn(self.fetch_now)
        except Exception:
            with self._lock:
                self._running = False
            raise
        return True

    def fetch_now(self) -> None:
        """One fetch, in the calling thread (a worker's: it blocks). A failure keeps the
        current keys."""
        try:
            try:
                fetched = self._fetch()
            except Exception as exc:
                self.failures += 1
                log.warning(
                    "JWKS fetch from %s failed (keeping %d keys): %s",
                    self.url,
                    len(self._keys),
                    exc,
                )
                return
            keys = {
                k.key_id: k
                for k in fetched
                # An `oct` (HMAC) key or another algorithm never verifies an RS/ES token.
                if k.key_id and k.algorithm_name in self.algorithms
            }
            if self._keys.keys() - keys.keys():
                self.generation += 1
            self._keys = keys
            self._fetched_at = self._clock()
            log.info("JWKS from %s: %d keys (%s)", self.url, len(keys), ", ".join(sorted(keys)))
        finally:
            with self._lock:
                self._running = False
