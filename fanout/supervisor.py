"""`agora fanout` / `agora scores`: worker processes, restarted when they die.

The parent only watches: each worker runs in a child process, and a child that exits
unexpectedly (a crash, an OOM kill, `kill -9`) is started again after a backoff that
doubles while it keeps dying young and is capped by AGORA_WORKER_RESTART_MAX_MS. A child
that exits 0 was told to stop (SIGTERM/SIGINT, to it or to the parent, which forwards
them) and is not restarted. Each new child is told how often its slot was restarted and
carries the count in `agora_worker_restarts_total`.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("agora.supervisor")

PR_SET_PDEATHSIG = 1
FIRST_RESTART_S = 0.5
HEALTHY_AFTER_S = 60.0  # a child that lived this long starts the backoff over
STOP_GRACE_S = 20.0


def restart_delay(previous: float | None, lived_s: float, cap_s: float) -> float:
    """How long to wait before restarting a child that lived `lived_s` seconds, when the
    last wait for its slot was `previous` (None: never restarted). Pure."""
    if previous is None or lived_s >= HEALTHY_AFTER_S:
        return min(FIRST_RESTART_S, cap_s)
    return min(cap_s, previous * 2)


@dataclass
class _Slot:
    index: int
    proc: multiprocessing.Process | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float | None = None
    restart_at: float | None = None


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies (even by SIGKILL): a worker without
    its supervisor would otherwise live on unsupervised next to its replacement."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the orchestrator's process-group kill is the fallback
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _child(target: Callable[[int, int], None], index: int, restarts: int, parent: int) -> None:
    # The parent's handlers were inherited by the fork; the worker installs its own.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with_parent(parent)
    target(index, restarts)


def supervise(
    target: Callable[[int, int], None], workers: int, role: str, restart_max_s: float
) -> int:
    """Run `target(index, restarts)` in `workers` child processes until SIGTERM/SIGINT."""
    slots = [_Slot(i) for i in range(max(1, workers))]
    stopping = False

    def start(slot: _Slot) -> None:
        slot.proc = multiprocessing.Process(
            target=_child,
            args=(target, slot.index, slot.restarts, os.getpid()),
            name=f"{role}-{slot.index}",
        )
        slot.proc.start()
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("%s worker %d started (pid %s)", role, slot.index, slot.proc.pid)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for slot in slots:
            if slot.proc is not None and slot.proc.pid and slot.proc.exitcode is None:
                os.kill(slot.proc.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in slots:
        start(slot)
    while not stopping:
        alive = [s.proc.sentinel for s in slots if s.proc is not None]
        if not alive and all(s.restart_at is None for s in slots):
            return 0  # every child stopped on purpose
        if alive:
            multiprocessing.connection.wait(alive, timeout=0.2)
        else:
            time.sleep(0.2)  # only restarts pending
        now = time.monotonic()
        for slot in slots:
            proc = slot.proc
            if proc is not None and proc.exitcode is not None and not stopping:
                proc.join()
                slot.proc = None
                if proc.exitcode == 0:
                    log.info("%s worker %d (pid %s) stopped", role, slot.index, proc.pid)
                    continue
                lived = now - slot.started
                slot.delay = restart_delay(slot.delay, lived, restart_max_s)
                slot.restart_at = now + slot.delay
                slot.restarts += 1
                log.error(
                    "%s worker %d (pid %s) exited with %s after %.1fs; restarting in %.1fs "
                    "(restart %d)",
                    role,
                    slot.index,
                    proc.pid,
                    proc.exitcode,
                    lived,
                    slot.delay,
                    slot.restarts,
                )
            due = slot.restart_at is not None and now >= slot.restart_at
            if slot.proc is None and due and not stopping:
                start(slot)
    deadline = time.monotonic() + STOP_GRACE_S
    for slot in slots:
        if slot.proc is not None:
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            if slot.proc.exitcode is None:
                log.error("%s worker %d did not stop; killing it", role, slot.index)
                slot.proc.kill()
                slot.proc.join()
    return 0
