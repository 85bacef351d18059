"""What waking an idle process through a loopback socket costs on this VM (issue 14's
floors): every hop of a message (gateway, broker, worker, PostgreSQL, Redis, gateways)
wakes a sleeping process at least once, and at 500 msgs/s none of them stays busy.

An echo server pinned to --server-core (bench/wakeup.c: epoll, read a byte, write it back;
or `--python`: an asyncio Protocol doing the same, as Agora's processes are), a C client
on --client-core sending one byte and waiting for its echo, --pings times per gap: GAP_US
apart (the server idles between pings) or back to back (0: it hardly sleeps). Per gap: the
server's on-CPU time per wake-up (/proc/PID/schedstat), the client's per ping, the round
trip's p50/p99.

    flock /tmp/agora-bench.lock .venv/bin/python -m bench.wakeup [--python]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.engines import free_port

SOURCE = Path(__file__).with_name("wakeup.c")


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _python_server(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gaps-us", default="10000,2000,1000,0")
    p.add_argument("--pings", type=int, default=3000)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--python", action="store_true", help="an asyncio echo server")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(_python_server(args.serve))
        return
    binary = Path(tempfile.mkdtemp(prefix="wakeup-")) / "wakeup"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(SOURCE)], check=True)
    for gap in args.gaps_us.split(","):
        port = free_port()
        if args.python:
            cmd = [sys.executable, "-m", "bench.wakeup", "--serve", str(port)]
        else:
            cmd = [str(binary), "server", str(port)]
        server = subprocess.Popen(["taskset", "-c", str(args.server_core), *cmd])
        try:
            time.sleep(1.0)  # listening
            client = [str(binary), "client", str(port), str(server.pid), str(args.pings), gap]
            got = subprocess.run(
                ["taskset", "-c", str(args.client_core), *client],
                check=True,
                capture_output=True,
                text=True,
            )
            kind = "python asyncio" if args.python else "C epoll"
            print(f"{kind} server: {got.stdout.strip()} load {os.getloadavg()[0]:.2f}")
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
