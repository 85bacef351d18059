"""The metrics of one process, on prometheus_client, and the `/metrics` endpoint of workers.

Every Agora process owns one `ProcessRegistry` (a `CollectorRegistry`, never the library's
global one), built by its composition root and passed down like `Settings`, so tests read a
process's numbers without globals. Its `role` and `node` labels go on every sample.

Events counted where they happen (a close, an HTTP response, a batch) use the library's
`Counter`/`Gauge`/`Histogram`. Counters the hot paths keep anyway as plain ints (frames,
bytes, deliveries, acked sends) stay plain ints and are read at scrape time by `ReadAtScrape`:
the per-frame paths pay one integer increment, not a lock. The recipient-weighted
delivery latency is a `WeightedHistogram`: one observation per message per node, counted
once per recipient, which the library's `Histogram.observe` cannot do without a call per
recipient.
"""

from __future__ import annotations

import bisect
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

log = logging.getLogger("agora.metrics")

# The families and label sets are Agora's own; `_created` series would double every counter.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library

# End-to-end latency, seconds: from a few ms (same host) to a stalled consumer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

LabelValues = tuple[str, ...]


class ProcessRegistry(CollectorRegistry):
    """The metrics of one process. `const_labels` (role, node) go first on every sample;
    they can change until the first scrape (the gateway learns its node id in lifespan)."""

    def __init__(self, const_labels: dict[str, str] | None = None, *, runtime: bool = True) -> None:
        super().__init__()
        self.const_labels = dict(const_labels or {})
        if runtime:  # process_* (CPU, memory, fds), python_gc_*, python_info
            ProcessCollector(registry=self)
            GCCollector(registry=self)
            PlatformCollector(registry=self)

    def collect(self) -> Iterable[Metric]:
        const = self.const_labels
        for metric in super().collect():
            if const:
                metric.samples = [s._replace(labels={**const, **s.labels}) for s in metric.samples]
            yield metric

    def render(self) -> str:
        return generate_latest(self).decode()


class ReadAtScrape(Collector):
    """A counter or gauge read when scraped, from something another module already counts.

    `read` returns one number, or a mapping from label values to numbers. A source that
    cannot be read yet (the gateway before its lifespan ran) is left out of that scrape."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        doc: str,
        kind: str,
        read: Callable[[], float | dict[LabelValues, float]],
        labelnames: Sequence[str] = (),
    ) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError("a value read at scrape time is a counter or a gauge")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        self.name, self.doc, self.kind = name, doc, kind
        self.read = read
        self.labelnames = tuple(labelnames)
        registry.register(self)

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        return GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]  # names only, for the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        try:
            got = self.read()
            values = dict(got) if isinstance(got, dict) else {(): got}
        except Exception as exc:  # a scrape must not fail because one source is not ready
            log.debug("metric %s unreadable: %s", self.name, exc)
            return
        family = self._family()
        for labels, value in values.items():
            family.add_metric(list(labels), float(value))
        yield family


class WeightedHistogram(Collector):
    """A histogram whose observations carry a weight: one message written to `count`
    sockets at once is one `observe(latency, count)`, a bisect and three adds."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        doc: str,
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        self.name, self.doc = name, doc
        self.bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not self.bounds:
            raise ValueError(f"histogram {name} needs at least one finite bucket")
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        # Everything runs on one event loop: no lock. bisect_left: `le` is inclusive.
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.doc)]

    def collect(self) -> Iterator[Metric]:
        counts, total = list(self.counts), self.sum  # one consistent copy for this scrape
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if math.isinf(bound) else repr(bound), cumulative))
        family = HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], buckets, total)
        yield family


# -- the endpoint of processes that serve no HTTP of their own (fan-out, scores) -----------


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape is noise; the process's own logs say what matters


def wsgi_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """`/metrics` (the library's app), `/healthz` for container health checks, 404 else:
    the library's app answers every path with a full scrape."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] != "GET":
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain")])
            return [b"GET only\n"]
        if path == "/metrics":
            result: Iterable[bytes] = metrics(environ, start_response)
            return result
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics\n"]

    return app


class MetricsServer:
    """The library's threaded WSGI server on host:port, in a daemon thread. A scrape runs
    on that thread: collectors read plain ints and lists the loop writes (atomic under the
    GIL), and the library's own metrics lock."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        self._httpd = make_server(host, port, wsgi_app(registry), Server, handler_class=_Quiet)
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="agora-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving and free the port (blocks up to the server's 0.5 s poll)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Start `GET /metrics` (and `/healthz`) on host:port; the caller closes the server."""
    return MetricsServer(registry, host, port)
