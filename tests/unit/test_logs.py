"""core.logs: one JSON object per line, with node, role and connection ids."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from core import logs


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("agora.test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


@pytest.fixture(autouse=True)
def _process_fields() -> None:
    logs.set_process(role="gateway", node="n1")


def test_json_line_carries_process_fields_extras_and_message() -> None:
    line = logs.JsonFormatter().format(_record("sent %d", 3, conv="42"))
    assert "\n" not in line
    doc = orjson.loads(line)
    assert doc["msg"] == "sent 3"
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "agora.test"
    assert (doc["role"], doc["node"]) == ("gateway", "n1")
    assert doc["conv"] == "42"
    assert doc["ts"].endswith("Z")
    assert "conn" not in doc


async def test_connection_id_follows_the_task_and_its_children_only() -> None:
    fmt = logs.JsonFormatter()
    seen: dict[str, object] = {}

    async def connection(name: str) -> None:
        logs.bind_connection(name)

        async def child() -> None:
            seen[f"{name}-child"] = orjson.loads(fmt.format(_record("x"))).get("conn")

        await asyncio.create_task(child())
        seen[name] = orjson.loads(fmt.format(_record("x"))).get("conn")

    await asyncio.gather(connection("c1"), connection("c2"))
    assert seen == {"c1": "c1", "c1-child": "c1", "c2": "c2", "c2-child": "c2"}
    assert orjson.loads(fmt.format(_record("x"))).get("conn") is None  # not leaked here


def test_exceptions_are_one_field_not_extra_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record("failed")
        record.exc_info = sys.exc_info()
    doc = orjson.loads(logs.JsonFormatter().format(record))
    assert "ValueError: boom" in doc["exc"]


def test_text_format_keeps_the_fields_readable() -> None:
    line = logs.TextFormatter().format(_record("hello"))
    assert "hello" in line and "node=n1" in line and "role=gateway" in line
