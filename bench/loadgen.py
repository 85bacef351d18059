"""Load-generator worker processes, each with its own uvloop event loop.

One Python process cannot hold more connections than its file limit, nor open them as fast
as several can, so the benchmarks split their clients over worker processes (all pinned to
the load generator's core). The parent drives them with commands: `await pool.call(name,
[kwargs per worker])` runs `await worker.name(**kwargs)` in every worker at once and returns
their answers in worker order. A worker class is any class with async methods, named by
"module:Class" so the spawned process can import it.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import multiprocessing.connection
import traceback
from collections.abc import Sequence
from typing import Any

from bench.common import pin, raise_nofile

_STOP = "__stop__"


def _child(target: str, conn: multiprocessing.connection.Connection, cpus: set[int] | None) -> None:
    pin(cpus)
    raise_nofile()
    import uvloop

    module, cls = target.split(":")
    worker_cls = getattr(importlib.import_module(module), cls)

    async def main() -> None:
        worker = worker_cls()
        loop = asyncio.get_running_loop()
        while True:
            cmd, kwargs = await loop.run_in_executor(None, conn.recv)
            if cmd == _STOP:
                break
            try:
                result = await getattr(worker, cmd)(**kwargs)
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))

    uvloop.run(main())
    conn.close()


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, target: str, count: int, cpus: set[int] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(target, child, cpus), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._conns)

    @property
    def pids(self) -> list[int]:
        return [p.pid or 0 for p in self._procs]

    async def call(
        self, cmd: str, kwargs: Sequence[dict[str, Any]] | dict[str, Any] | None = None
    ) -> list[Any]:
        """Run `cmd` in every worker (kwargs: one dict for all, or one per worker)."""
        if kwargs is None:
            kwargs = {}
        per = [kwargs] * self.size if isinstance(kwargs, dict) else list(kwargs)
        if len(per) != self.size:
            raise ValueError(f"{len(per)} kwargs for {self.size} workers")
        loop = asyncio.get_running_loop()
        for conn, kw in zip(self._conns, per, strict=True):
            conn.send((cmd, kw))
        replies = await asyncio.gather(
            *(loop.run_in_executor(None, conn.recv) for conn in self._conns)
        )
        out = []
        for status, value in replies:
            if status != "ok":
                raise WorkerError(f"worker failed in {cmd}:\n{value}")
            out.append(value)
        return out

    def close(self, timeout: float = 10) -> None:
        for conn in self._conns:
            try:
                conn.send((_STOP, {}))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """`items` dealt into `parts` lists of near-equal size (round robin)."""
    out: list[list[Any]] = [[] for _ in range(parts)]
    for i, item in enumerate(items):
        out[i % parts].append(item)
    return out
