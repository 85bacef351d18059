"""Structured logs: one JSON object per line, carrying the process's node and role and,
inside a WebSocket connection's tasks, that connection's id.

The node id is process-wide (one node per process); the connection id is a ContextVar, so
it follows the connection's own task and every task created from it (asyncio copies the
context) without being passed through every call. `configure` is called once by each
composition root (`agora ...` in gateway/cli.py, uvicorn's factory in gateway/app.py).
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

connection_id: ContextVar[str | None] = ContextVar("agora_connection_id", default=None)

_process: dict[str, str] = {}

# LogRecord attributes that are not the caller's `extra=` fields.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def set_process(**fields: str) -> None:
    """Fields on every line of this process (`node`, `role`); later calls add or replace."""
    _process.update(fields)


def bind_connection(conn_id: str | int) -> None:
    """Tag the current task (and tasks it starts) with a connection id."""
    connection_id.set(str(conn_id))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_process)
        conn = connection_id.get()
        if conn is not None:
            out["conn"] = conn
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """For a person at a terminal: the same fields, one readable line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [f"{k}={v}" for k, v in _process.items()]
        conn = connection_id.get()
        if conn is not None:
            tags.append(f"conn={conn}")
        return f"{line} [{' '.join(tags)}]" if tags else line


def configure(level: str, fmt: str = "json") -> None:
    """Route every logger (uvicorn's and aiokafka's included) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn installs its own handlers when given a log config; with log_config=None
        # it does not, and its records must reach ours exactly once.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
