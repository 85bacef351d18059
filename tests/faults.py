"""What the fault tests and `bench.faults` share: engines a fault run owns, so it may stop
and restart them (a private Redis server and a private PostgreSQL cluster, each on a free
port, stopped by their own PID), and the database faults themselves (read-only, timeouts,
a forced deadlock, terminated sessions), aimed at one shard database.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from core.settings import Settings
from devstack import services
from devstack.services import wait_port
from storage.migrate import migrate_all
from tests.engines import free_port


class OwnRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_port("127.0.0.1", self.port, 10):
            raise RuntimeError("private redis did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class OwnPostgres:
    """A throwaway PostgreSQL cluster (initdb as the postgres user, trust auth)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="agora-pg-"))
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found")
        self.bin = Path(bins[-1])
        self.data = self.dir / "data"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def dsn(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.dir / "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        if not wait_port("127.0.0.1", self.port, 30):
            raise RuntimeError("private postgres did not start")

    def stop(self, mode: str = "immediate") -> None:
        """`pg_ctl stop -m mode`: "fast" ends every session cleanly (a planned restart),
        "immediate" is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        deadline = time.monotonic() + 10
        while wait_port("127.0.0.1", self.port, 0.1) and time.monotonic() < deadline:
            time.sleep(0.1)

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_shard(settings: Settings) -> Iterator[tuple[Settings, OwnPostgres]]:
    """`settings` with physical shard #1 moved to a private, migrated PostgreSQL cluster
    (shard #0 stays where it was): a run may stop and start that shard's server."""
    pg = OwnPostgres()
    try:
        pg.init()
        pg.start()
        dsn = pg.dsn("agora_shard_x")
        asyncio.run(services.ensure_databases((dsn,)))
        asyncio.run(migrate_all([dsn]))
        yield settings.with_overrides(shard_dsns=(settings.shard_dsns[0], dsn)), pg
    finally:
        pg.destroy()


# -- database faults aimed at one shard database ----------------------------------------------


@dataclass
class Target:
    """What a fault is aimed at: a shard database, two of its conversations, and the
    worker's log (to see that the fault reached it)."""

    admin: asyncpg.Connection
    dsn: str
    db: str
    convs: list[int]
    worker_log: Callable[[], str]


Fault = Callable[[Target], Awaitable[None]]


async def terminate_others(
    admin: asyncpg.Connection, db: str, keep: asyncpg.Connection | None = None
) -> int:
    """End every session on `db` but ours: the pools reconnect and pick up new settings."""
    n: int = await admin.fetchval(
        """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
           WHERE datname = $1 AND pid <> pg_backend_pid() AND pid <> $2""",
        db,
        keep.get_server_pid() if keep is not None else 0,
    )
    return n


async def read_only_3s(t: Target) -> None:
    await t.admin.execute(f'ALTER DATABASE "{t.db}" SET default_transaction_read_only = on')
    await terminate_others(t.admin, t.db)
    await asyncio.sleep(3)
    await t.admin.execute(f'ALTER DATABASE "{t.db}" RESET default_transaction_read_only')
    await terminate_others(t.admin, t.db)


@contextlib.asynccontextmanager
async def row_locked(dsn: str, conv: int) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conv)
        try:
            yield conn
        finally:
            await tx.rollback()
    finally:
        await conn.close()


def timeout_fault(setting: str) -> Fault:
    async def fault(t: Target) -> None:
        # The lock is taken by a session opened before the setting: it holds, the worker's
        # new sessions (their pools reconnect after the terminate) give up after 300 ms.
        async with row_locked(t.dsn, t.convs[0]) as locker:
            await t.admin.execute(f"ALTER DATABASE \"{t.db}\" SET {setting} = '300ms'")
            await terminate_others(t.admin, t.db, keep=locker)
            await asyncio.sleep(3)
            await t.admin.execute(f'ALTER DATABASE "{t.db}" RESET {setting}')
        await terminate_others(t.admin, t.db)

    return fault


async def terminate_repeatedly(t: Target) -> None:
    for _ in range(10):
        await terminate_others(t.admin, t.db)
        await asyncio.sleep(0.3)


_DEADLOCK_KEY = 0x6465616C  # "deal": the advisory lock a forced deadlock turns on


async def deadlock(t: Target) -> None:
    """Force a deadlock the worker must lose, whatever its batches hold.

    The worker's statement or transaction locks its conversation rows first and inserts
    into `messages` second. A trigger on `messages` makes each inserted row first take a
    shared advisory lock that we hold exclusively; once a worker waits on it (it then holds
    its conversation rows) we update every conversation row: each side waits on the other.
    (Taking `messages` itself would not do: the one-statement path, storage/onetrip.py,
    takes its table locks when it starts, before any row lock, so it would only wait.)
    The worker began waiting first and runs with the server's deadlock timer, ours is set
    far longer, so PostgreSQL aborts the worker's transaction (40P01), never ours."""
    conn = await asyncpg.connect(t.dsn)
    name = "t_forced_deadlock"
    try:
        await conn.execute(
            f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_advisory_xact_lock_shared({_DEADLOCK_KEY}); RETURN NEW; END $$"""
        )
        await conn.execute(
            f"CREATE TRIGGER {name} BEFORE INSERT ON messages"
            f" FOR EACH ROW EXECUTE FUNCTION {name}()"
        )
        async with conn.transaction():
            await conn.execute("SET LOCAL deadlock_timeout = '60s'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _DEADLOCK_KEY)
            await _wait_for_lock_wait(t, "advisory", timeout=10)
            await conn.execute(
                "UPDATE conversations SET title = title WHERE id = ANY($1::bigint[])", t.convs
            )
            # Rolled back: the worker retries its batch against the rows as they were.
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await conn.execute(f"DROP TRIGGER IF EXISTS {name} ON messages")
        await conn.execute(f"DROP FUNCTION IF EXISTS {name}()")
        await conn.close()
    # The worker logs the failed attempt after its rollback: give the line a moment.
    deadline = time.monotonic() + 10
    while "40P01" not in t.worker_log():
        if time.monotonic() > deadline:
            raise AssertionError("the worker's transaction was not the deadlock's victim")
        await asyncio.sleep(0.05)


class _Rollback(Exception):
    """Leaves the injector's transaction without committing anything."""


async def _wait_for_lock_wait(t: Target, wait_event: str, timeout: float) -> None:
    """Poll until a session on the shard waits on a lock of kind `wait_event`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = await t.admin.fetchval(
            """SELECT count(*) FROM pg_stat_activity WHERE datname = $1
               AND wait_event_type = 'Lock' AND wait_event = $2""",
            t.db,
            wait_event,
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no worker statement waited on a {wait_event} lock in {timeout} s")
