"""hello is the first frame and goes out once the connection is registered: frames pushed
meanwhile wait behind it, in order (gateway/connection.py). No I/O."""

from __future__ import annotations

from gateway.connection import Connection
from gateway.protocol import codec
from tests.unit.test_metrics import _Socket


def test_frames_pushed_before_greet_follow_hello_in_order() -> None:
    sock = _Socket()
    conn = Connection(sock, codec.JSON, "a", 10, 1 << 20)
    hello, joined, notify = ({"t": t, "n": i} for i, t in enumerate(("hello", "joined", "notify")))
    conn.hold_greeting(hello)
    conn.push_frame(joined)
    conn.push_frame(notify)
    assert sock.written == []  # nothing before the registration is done
    conn.greet()
    assert sock.written == [codec.JSON.frame(f) for f in (hello, joined, notify)]
    conn.push_frame({"t": "pong", "rid": 1})  # after greet: straight to the socket
    assert sock.written[-1] == codec.JSON.frame({"t": "pong", "rid": 1})
    assert conn.wire.frames_out == 4


def test_a_connection_closed_before_greet_writes_only_its_close() -> None:
    sock = _Socket()
    conn = Connection(sock, codec.JSON, "a", 10, 1 << 20)
    conn.hold_greeting({"t": "hello", "user": "a"})
    conn.close(1001, "going away")
    conn.greet()
    assert sock.written == [] and sock.closes == [1001]
