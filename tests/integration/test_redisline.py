"""The send path's pipelined Redis connection (storage/redisline.py) against a real Redis:
replies matched in order under concurrency, errors, the script reloaded after a restart,
reconnecting after a kill, and a Redis that stops answering failing within the timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from devstack.services import wait_port
from storage.redisline import RedisLine
from tests.engines import free_port
from tests.faults import OwnRedis

pytestmark = pytest.mark.engines

SCRIPT = "return {KEYS[1], tonumber(ARGV[1]) * 2}"


async def test_concurrent_commands_get_their_own_replies(own_redis: OwnRedis) -> None:
    line = RedisLine(own_redis.url.replace("/0", "/3"), 5)
    try:
        await asyncio.gather(*(line.execute("SET", f"k{i}", i) for i in range(200)))
        got = await asyncio.gather(*(line.execute("GET", f"k{i}") for i in range(200)))
        assert got == [str(i).encode() for i in range(200)]
        assert await line.execute("DBSIZE") == 200
        assert line.connects == 1  # every command shared one connection
        # The URL's database was selected: database 0 is empty.
        other = RedisLine(own_redis.url, 5)
        assert await other.execute("DBSIZE") == 0
        other.close()
    finally:
        line.close()


async def test_errors_and_a_script_reloaded_after_a_restart(own_redis: OwnRedis) -> None:
    line = RedisLine(own_redis.url, 5)
    sha = line.script(SCRIPT)
    try:
        assert await line.execute("LPUSH", "s", "x") == 1
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await line.execute("INCR", "s")
        assert await line.execute("PING") == b"PONG"  # the connection still answers in order
        assert await line.evalsha(sha, ["a"], [21]) == [b"a", 42]
        own_redis.kill()
        with pytest.raises(RedisConnectionError):
            await line.execute("PING")
        own_redis.start()  # empty: no script cached
        assert await line.evalsha(sha, ["b"], [2]) == [b"b", 4]
        assert line.connects == 2
    finally:
        line.close()


async def test_a_redis_that_stops_answering_fails_within_the_timeout(
    own_redis: OwnRedis,
) -> None:
    line = RedisLine(own_redis.url, 3)
    try:
        assert await line.execute("PING") == b"PONG"
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                *(line.execute("INCR", "n") for _ in range(5)), return_exceptions=True
            )
            took = time.monotonic() - started
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert all(isinstance(r, Exception) and "time" in str(r) for r in results), results
        assert 2.5 < took < 4.5
        # A new connection afterwards (the old one may be half open).
        assert await line.execute("PING") == b"PONG"
        assert line.connects == 2
    finally:
        line.close()


def test_on_uvloop(own_redis: OwnRedis) -> None:
    """The gateway's loop: its transports are not asyncio.Transport subclasses."""

    async def main() -> list[Any]:
        line = RedisLine(own_redis.url, 5)
        try:
            return list(await asyncio.gather(*(line.execute("INCR", "u") for _ in range(50))))
        finally:
            line.close()

    assert uvloop.run(main()) == list(range(1, 51))


async def test_a_command_not_waited_for_runs_before_the_next(own_redis: OwnRedis) -> None:
    line = RedisLine(own_redis.url, 5)
    try:
        line.send("SET", "w", "1")  # not connected yet: connects first
        assert await line.execute("GET", "w") == b"1"
        for i in range(100):
            line.send("SET", "w", i)
        assert await line.execute("GET", "w") == b"99"
        line.send("INCR", "no-such-command-reply-is-an-error", "extra")  # its error dropped
        assert await line.execute("PING") == b"PONG"
        assert line.connects == 1
    finally:
        line.close()


async def test_a_command_not_waited_for_asks_redis_for_no_reply(own_redis: OwnRedis) -> None:
    """`send` writes CLIENT REPLY SKIP with the command: Redis runs it and answers nothing
    (a reply would be one nobody asked for: the line would give the connection up), and
    the commands awaited after it get their own replies."""
    line = RedisLine(own_redis.url, 5)
    try:
        await line.execute("PING")
        proto = line._proto
        assert proto is not None and proto.skips_replies
        for i in range(50):
            line.send("SET", "s", i)
        assert not proto.waiting  # no reply expected for any of them
        assert await line.execute("GET", "s") == b"49"
        line.send("INCR", "s", "extra")  # an error: not answered either
        assert await line.execute("INCR", "s") == 50
        assert line.connects == 1 and line._proto is proto and proto.lost is None
    finally:
        line.close()


@pytest.fixture
def redis_without_client() -> Iterator[str]:
    """A Redis whose CLIENT command is renamed away (like a proxy that refuses it)."""
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    argv += ["--appendonly", "no", "--rename-command", "CLIENT", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_port("127.0.0.1", port, 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


async def test_a_redis_without_client_reply_gets_each_reply_read_and_dropped(
    redis_without_client: str,
) -> None:
    """A Redis (or proxy) that refuses CLIENT REPLY answers every command; `send`'s
    replies are then read and dropped, in order, as before."""
    line = RedisLine(redis_without_client, 5)
    try:
        for i in range(20):
            line.send("SET", "s", i)  # queued until connected, then written
        assert await line.execute("GET", "s") == b"19"
        proto = line._proto
        assert proto is not None and not proto.skips_replies
        line.send("SET", "s", "x")
        assert len(proto.waiting) == 1  # its reply is read and dropped
        assert await line.execute("GET", "s") == b"x"
        assert line.connects == 1 and proto.lost is None
    finally:
        line.close()


async def test_a_pipeline_answers_in_order_between_other_commands(own_redis: OwnRedis) -> None:
    """`pipeline`: commands written together, their replies in order, other commands on
    the line answered theirs; a command's error raises once all replies are in (the other
    commands ran), and the line goes on answering in order."""
    line = RedisLine(own_redis.url, 5)
    try:
        before = line.execute("SET", "p", "0")
        many = line.pipeline([("INCR", "p"), ("INCR", "p"), ("GET", "p")])
        after = line.execute("GET", "p")
        assert await asyncio.gather(before, many, after) == [b"OK", [1, 2, b"2"], b"2"]
        assert await line.pipeline([]) == []
        await line.execute("LPUSH", "l", "x")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await line.pipeline([("INCR", "p"), ("INCR", "l"), ("INCR", "p")])
        assert await line.execute("GET", "p") == b"4"  # both INCRs of p ran
        # raise_on_error=False: the error is that command's reply, in its place.
        replies = await line.pipeline(
            [("INCR", "p"), ("INCR", "l"), ("INCR", "p")], raise_on_error=False
        )
        assert replies[0::2] == [5, 6]
        assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
        assert await line.execute("GET", "p") == b"6"
        assert line.connects == 1
    finally:
        line.close()
