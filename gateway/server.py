"""Running gateway processes: a uvicorn server that drains before it stops, and a
supervisor for `--workers N` (each worker its own process and node, sharing the port
through SO_REUSEPORT so the kernel spreads connections across them).

Why not uvicorn's own shutdown: it closes every WebSocket with 1012 at once. On SIGTERM a
gateway first stops accepting, tells its clients to `reconnect` at times spread over a
window, lets requests in flight finish (no accepted message loses its `ack`), and closes
what is left with 1001 at a deadline.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from core.settings import Settings
from gateway.app import create_app
from gateway.auth import TokenVerifier
from gateway.http import dev
from gateway.transport import GatewayHttpProtocol
from gateway.ws import Endpoint

log = logging.getLogger("agora.gateway")
# How long a stopping node waits for its clients' close handshakes: their close frames
# are written by then unless a client is not reading (and it was told to go long before).
CLOSE_WAIT_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Profiled (bench/RESULTS.md): the cyclic GC took ~10% of a connection storm,
        # mostly re-scanning the long-lived start-up objects. Freeze those out of its
        # view and collect the young generation less often: connections make many small
        # objects, few of them cycles. Cut gateway CPU per connection by 25-30%.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting before anything else
        node = getattr(self.app.state, "node", None)
        settings: Settings | None = getattr(self.app.state, "settings", None)
        endpoint: Endpoint = self.app.state.endpoint
        if node is not None and settings is not None and not self.force_exit:
            await node.drain(settings.drain_window_ms, settings.drain_deadline_ms)
            # The node is done with them; let their close frames reach the clients (the
            # sockets are ours, not uvicorn's, so its shutdown would not wait for them).
            await endpoint.wait_closed(CLOSE_WAIT_S)
        await super().shutdown(sockets)  # the lifespan's end closes whoever is left
        if not self.force_exit:
            await endpoint.wait_closed(CLOSE_WAIT_S)


def listen_socket(host: str, port: int, send_buffer: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if send_buffer:
        # Accepted sockets inherit it from the listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def check(settings: Settings, host: str) -> None:
    """ConfigError when this gateway must not start: keys or secrets unusable or weak, dev
    mode on an address others can reach."""
    dev.check_bind(settings, host)
    dev.check_settings(settings)
    TokenVerifier(settings, prefetch=False)  # a check: no JWKS fetch


def serve(settings: Settings, host: str, port: int) -> None:
    """One gateway node in this process, until SIGTERM/SIGINT (then drain)."""
    check(settings, host)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        # HTTP through uvicorn to the ASGI app; /v1/ws upgrades to gateway.transport.
        http=GatewayHttpProtocol.bound_to(app.state.endpoint),
        backlog=4096,
        timeout_graceful_shutdown=10,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the process's logging (JSON lines) for uvicorn's own too
        access_log=False,
        lifespan="on",
    )
    sock = listen_socket(host, port, settings.socket_send_buffer)
    DrainingServer(config, app).run(sockets=[sock])


def supervise(argv_for_child: list[str], workers: int) -> int:
    """Run `workers` gateway processes; restart one that dies; forward SIGTERM/SIGINT."""
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", *argv_for_child])

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    children.extend(spawn() for _ in range(workers))
    while True:
        time.sleep(0.5)
        if stopping:
            break
        for i, child in enumerate(children):
            if child.poll() is not None:
                log.warning(
                    "gateway worker pid %d exited (%s); restarting", child.pid, child.returncode
                )
                children[i] = spawn()
    for child in children:
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0
