"""bench.common's /metrics reader, against a real HTTP server on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.common import metric_samples, sample_value

PAGE = b"""# HELP agora_produce_line_records_total records
# TYPE agora_produce_line_records_total counter
agora_produce_line_records_total 12.0
agora_produce_line_requests_total 5.0
agora_delivery_latency_seconds_bucket{le="0.005"} 7.0
"""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_samples_by_prefix_without_comments(url: str) -> None:
    lines = metric_samples(url, ("agora_produce_line_",))
    assert lines == [
        "agora_produce_line_records_total 12.0",
        "agora_produce_line_requests_total 5.0",
    ]
    assert [sample_value(x) for x in lines] == [12.0, 5.0]
    every = metric_samples(url)
    assert every is not None and len(every) == 3 and not any(x.startswith("#") for x in every)
    assert sample_value(every[2]) == 7.0  # the labels' braces and quotes do not matter


def test_a_page_that_cannot_be_read_is_none(url: str) -> None:
    server_gone = url.replace("/metrics", "").rsplit(":", 1)[0] + ":1/metrics"
    assert metric_samples(server_gone) is None
