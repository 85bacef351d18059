"""Real Agora processes for end-to-end tests: gateway nodes and fan-out workers.

Each process is started with the test session's AGORA_* environment, and stopped (or
killed, when a test says so) by its own PID.

Crashes and unhandled errors fail the test
------------------------------------------
Every process a `Stack` starts is watched; nothing needs to be called for it. After each
test (and after each module's and session's fixtures are torn down) the autouse fixtures in
tests/conftest.py call `check_procs()`, and the test fails, naming the process and showing
the tail of its log, when one of its processes:

- exited without the test asking for it: the test did not call `stop()`, `terminate()`,
  `kill()` or `expect_exit()` on it (or `Stack.stop_all()`); or it exited after `stop()` /
  `terminate()` with a code other than 0 or -SIGTERM, or needed SIGKILL after `stop()`;
- logged (since the previous check) a line at ERROR or CRITICAL, a line with a traceback
  (the `exc` field of the JSON lines, core/logs.py), or a raw traceback on stderr.

A test that provokes errors on purpose declares each one it expects, as a regular
expression searched in the line's logger name, message and traceback:

    stack.expect_log(r"shard .* unavailable")      # any process of this stack
    g1.expect_log(r"agora.node: subscribe failed")  # one process

Expectations last as long as the stack (or process) does, so a module-scoped stack shared by
several tests should be given them only by the test that causes the errors, near its end,
or be a stack of its own. A process the test kills, stops or SIGTERMs must be stopped
through `kill()`, `stop()` or `terminate()` (not `popen.send_signal`), so that its exit is
known to be wanted; one expected to exit by itself is marked with `expect_exit()`. To
freeze a process (SIGSTOP/SIGCONT), `signal_all()` reaches a supervised worker's child too.
bench/stack.py's processes get the same check when a `bench_stack` ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import orjson

from core.settings import Settings
from gateway.auth import make_token
from tests.engines import free_port, settings_env

LOG_DIR = Path(".agora/test/logs")
TAIL_LINES = 40
_BAD_LEVELS = {"ERROR", "CRITICAL"}
_RAW_FAILURES = ("Traceback (most recent call last)", "Fatal Python error")

# Every process started by a Stack in this Python process and not yet finally checked.
WATCHED: list[Proc] = []


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int | None = None
    log_path: Path | None = None
    # Where this process's output starts in its log file (the file is appended to by
    # every process of that name) and how far the checks have read.
    log_start: int = 0
    checked_to: int = 0
    exit_requested: bool = False
    killed: bool = False
    stop_timed_out: bool = False
    expected: list[re.Pattern[str]] = field(default_factory=list)
    stack_expected: list[re.Pattern[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.log_path is None:
            self.log_path = LOG_DIR / f"{self.name}.log"
        self.checked_to = max(self.checked_to, self.log_start)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _log_bytes(self, start: int) -> bytes:
        assert self.log_path is not None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read()
        except FileNotFoundError:
            return b""

    def log_text(self) -> str:
        """This process's output (not that of earlier processes of the same name)."""
        return self._log_bytes(self.log_start).decode(errors="replace")

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

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

    def expect_log(self, pattern: str) -> None:
        """Let this process log ERROR lines / tracebacks matching `pattern` (re.search)."""
        self.expected.append(re.compile(pattern))

    def expect_exit(self) -> None:
        """This process is meant to exit by itself; any exit code is the test's business."""
        self.exit_requested = True
        self.killed = True

    def kill(self) -> None:
        """SIGKILL the process and its children (a supervised worker's child with it)."""
        self.exit_requested = True
        self.killed = True
        if self.alive():
            self.signal_all(signal.SIGKILL)
            self.popen.wait(10)

    def terminate(self) -> None:
        """SIGTERM without waiting (a test that watches the drain); see `stop`."""
        self.exit_requested = True
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15) -> None:
        self.exit_requested = True
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop_timed_out = True
                self.kill()

    def problems(self) -> list[str]:
        """What is wrong with this process since the last call (empty: nothing)."""
        found: list[str] = []
        code = self.popen.poll()
        if self.stop_timed_out:
            found.append("did not exit within its stop timeout after SIGTERM (was killed)")
        elif code is not None and not self.exit_requested:
            found.append(f"exited unexpectedly with code {code}")
        elif code is not None and not self.killed and code not in (0, -signal.SIGTERM):
            found.append(f"exited with code {code} after SIGTERM")
        data = self._log_bytes(self.checked_to)
        end = data.rfind(b"\n") + 1 if code is None else len(data)
        self.checked_to += end
        patterns = self.expected + self.stack_expected
        found.extend(bad_log_lines(data[:end].decode(errors="replace").splitlines(), patterns))
        return found


def bad_log_lines(lines: Iterable[str], expected: list[re.Pattern[str]]) -> list[str]:
    """Lines at ERROR/CRITICAL, with a traceback, or a raw traceback, not `expected`."""
    bad: list[str] = []
    for line in lines:
        text = line
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            if record.get("level") not in _BAD_LEVELS and "exc" not in record:
                continue
            text = f"{record.get('logger')}: {record.get('msg')}\n{record.get('exc', '')}"
        elif not line.startswith(_RAW_FAILURES):
            continue
        if not any(p.search(text) for p in expected):
            bad.append(f"logged: {line[:2000]}")
    return bad


def check_procs(procs: list[Proc] | None = None) -> str:
    """A report of every watched process's problems since the last check ("" if none);
    processes that have exited are checked one last time and no longer watched."""
    procs = WATCHED if procs is None else procs
    reports: list[str] = []
    for proc in list(procs):
        exited = not proc.alive()
        found = proc.problems()
        if found:
            lines = "\n  ".join(found)
            reports.append(
                f"Agora process {proc.name!r} (pid {proc.popen.pid}, log {proc.log_path}):\n"
                f"  {lines}\n--- last {TAIL_LINES} lines of its log ---\n{proc.log_tail()}"
            )
        if exited and proc in procs:
            procs.remove(proc)
    return "\n\n".join(reports)


@dataclass
class Stack:
    settings: Settings
    procs: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    expected: list[re.Pattern[str]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        return env

    def expect_log(self, pattern: str) -> None:
        """Let every process of this stack, started before or after, log ERROR lines /
        tracebacks matching `pattern` (re.search on logger, message and traceback)."""
        self.expected.append(re.compile(pattern))

    def _spawn(self, name: str, args: list[str], port: int | None = None) -> Proc:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        path = LOG_DIR / f"{name}.log"
        with open(path, "ab") as log:  # the child keeps its own descriptor
            start = log.tell()
            popen = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", *args],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: `kill` takes its children too
            )
        proc = Proc(name, popen, port, log_path=path, log_start=start)
        proc.stack_expected = self.expected
        self.procs.append(proc)
        WATCHED.append(proc)
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
        proc = self._spawn(name, [command])
        deadline = time.monotonic() + 30
        while wait:
            if not proc.alive():
                raise RuntimeError(f"{name} exited with {proc.popen.returncode}")
            if "worker started" in proc.log_text():
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
