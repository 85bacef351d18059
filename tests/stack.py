"""Real Agora processes for end-to-end tests: gateway nodes and fan-out workers.

Each process is started with the test session's AGORA_* environment, and stopped (or
killed, when a test says so) by its own PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.auth import make_token
from storage.settings import Settings
from tests.engines import free_port, settings_env

LOG_DIR = Path(".agora/test/logs")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return (LOG_DIR / f"{self.name}.log").read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_all(self, sig: int) -> None:
        """Send `sig` to the process and its children: SIGSTOP to a supervised worker must
        pause the child doing the work, not only its supervisor."""
        pid = self.popen.pid
        try:
            if os.getpgid(pid) == pid:  # spawned as its group's leader
                os.killpg(pid, sig)
            else:
                self.popen.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the process and its children (a supervised worker's child with it)."""
        if self.alive():
            self.signal_all(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Stack:
    settings: Settings
    procs: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, args: list[str], port: int | None = None) -> Proc:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        popen = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: `kill` takes its children too
        )
        proc = Proc(name, popen, port)
        self.procs.append(proc)
        return proc

    def gateway(self, name: str, port: int | None = None) -> Proc:
        port = port or free_port()
        proc = self._spawn(name, ["gateway", "--port", str(port)], port)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, 30)
        return proc

    def fanout(self, name: str, wait: bool = True) -> Proc:
        return self._worker(name, "fanout", wait)

    def scores(self, name: str, wait: bool = True) -> Proc:
        return self._worker(name, "scores", wait)

    def _worker(self, name: str, command: str, wait: bool) -> Proc:
        """Start a worker; by default return once it has joined its consumer group (it
        logs "worker started" after that), so a test's first messages are not raced
        against the group's first rebalance."""
        path = LOG_DIR / f"{name}.log"
        offset = path.stat().st_size if path.exists() else 0
        proc = self._spawn(name, [command])
        deadline = time.monotonic() + 30
        while wait:
            if not proc.alive():
                raise RuntimeError(f"{name} exited with {proc.popen.returncode}")
            with open(path, "rb") as f:
                f.seek(offset)
                if b"worker started" in f.read():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not join its group within 30 s")
            time.sleep(0.1)
        return proc

    def token(self, user: str, ttl: int = 3600) -> str:
        return make_token(self.settings.jwt_secret, user, None, ttl)

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()


class _Process(Protocol):
    name: str
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool: ...


def wait_http(url: str, proc: _Process, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready at {url} within {seconds}s")
