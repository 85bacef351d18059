"""A tiny, dependency-free Prometheus registry and the `/metrics` endpoint of worker processes.

Why not prometheus_client: its default registry is process-global and its multiprocess mode
needs a shared directory; every Agora process here owns one `Registry`, built by its
composition root and passed down (like `Settings`), so tests can read a process's numbers
without globals. The text format (version 0.0.4) is small enough to write by hand.

Everything runs on one event loop: no locks. Hot paths hold a child (`family.labels(...)`)
and call `inc()`/`observe()`, which are a float add and, for histograms, one bisect.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger("agora.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# End-to-end latency, seconds: from a few ms (same host) to a stalled consumer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    kind = "untyped"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def _check(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        return tuple(str(v) for v in values)


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, doc, labelnames)
        self._children: dict[LabelValues, CounterChild] = {}
        if not self.labelnames:
            self._children[()] = CounterChild()

    def labels(self, *values: str) -> CounterChild:
        key = self._check(values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def value(self, *values: str) -> float:
        child = self._children.get(self._check(values))
        return child.value if child is not None else 0.0

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_fmt(c.value)}"
            for k, c in self._children.items()
        ]


class Gauge(_Family):
    kind = "gauge"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self._children: dict[LabelValues, GaugeChild] = {}
        if not self.labelnames:
            self._children[()] = GaugeChild()

    def labels(self, *values: str) -> GaugeChild:
        key = self._check(values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = GaugeChild()
        return child

    def set(self, value: float) -> None:
        self.labels().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)

    def value(self, *values: str) -> float:
        child = self._children.get(self._check(values))
        return child.value if child is not None else 0.0

    def remove(self, *values: str) -> None:
        """Forget one label set (a partition this worker no longer owns)."""
        self._children.pop(self._check(values), None)

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_fmt(c.value)}"
            for k, c in self._children.items()
        ]


class HistogramChild:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Record `value` `count` times (one message written to `count` sockets at once)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.count += count
        self.sum += value * count


class Histogram(_Family):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not self.bounds:
            raise ValueError(f"histogram {name} needs at least one finite bucket")
        self._children: dict[LabelValues, HistogramChild] = {}
        if not self.labelnames:
            self._children[()] = HistogramChild(self.bounds)

    def labels(self, *values: str) -> HistogramChild:
        key = self._check(values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = HistogramChild(self.bounds)
        return child

    def observe(self, value: float, count: int = 1) -> None:
        self.labels().observe(value, count)

    def child(self, *values: str) -> HistogramChild | None:
        return self._children.get(self._check(values))

    def samples(self) -> list[str]:
        out: list[str] = []
        for key, child in self._children.items():
            cumulative = 0
            for bound, n in zip((*self.bounds, math.inf), child.counts, strict=True):
                cumulative += n
                le = f'le="{_fmt(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {cumulative}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(child.sum)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {child.count}")
        return out


class Callback(_Family):
    """A value read when scraped, from something another module already counts.

    `read` returns one number, or a mapping from label values to numbers."""

    def __init__(
        self,
        name: str,
        doc: str,
        kind: str,
        read: Callable[[], float | dict[LabelValues, float]],
        labelnames: Sequence[str] = (),
    ) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError("a callback is a counter or a gauge")
        super().__init__(name, doc, labelnames)
        self.kind = kind
        self.read = read

    def samples(self) -> list[str]:
        try:
            got = self.read()
        except Exception as exc:  # a scrape must not fail because one source is not ready
            log.debug("metric %s unreadable: %s", self.name, exc)
            return []
        if isinstance(got, dict):
            return [
                f"{self.name}{_labels(self.labelnames, k)} {_fmt(float(v))}" for k, v in got.items()
            ]
        return [f"{self.name}{_labels(self.labelnames, ())} {_fmt(float(got))}"]


class Registry:
    """The metrics of one process. `const_labels` (role, node) go on every sample."""

    def __init__(self, const_labels: dict[str, str] | None = None) -> None:
        self._families: dict[str, _Family] = {}
        self.const_labels = dict(const_labels or {})

    def _add(self, family: _Family) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} registered twice")
        self._families[family.name] = family

    def counter(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> Counter:
        c = Counter(name, doc, labelnames)
        self._add(c)
        return c

    def gauge(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> Gauge:
        g = Gauge(name, doc, labelnames)
        self._add(g)
        return g

    def histogram(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        h = Histogram(name, doc, labelnames, buckets)
        self._add(h)
        return h

    def callback(
        self,
        name: str,
        doc: str,
        kind: str,
        read: Callable[[], float | dict[LabelValues, float]],
        labelnames: Sequence[str] = (),
    ) -> Callback:
        c = Callback(name, doc, kind, read, labelnames)
        self._add(c)
        return c

    def get(self, name: str) -> _Family | None:
        return self._families.get(name)

    def render(self) -> str:
        const = ",".join(f'{k}="{_escape(v)}"' for k, v in self.const_labels.items())
        lines: list[str] = []
        for family in self._families.values():
            lines.extend(family.header())
            for sample in family.samples():
                lines.append(_with_const(sample, const) if const else sample)
        return "\n".join(lines) + "\n"


def _with_const(sample: str, const: str) -> str:
    name_end = sample.find("{")
    space = sample.rfind(" ")
    if name_end == -1 or name_end > space:
        return f"{sample[:space]}{{{const}}}{sample[space:]}"
    return f"{sample[: name_end + 1]}{const},{sample[name_end + 1 :]}"


# -- the endpoint of processes that serve no HTTP of their own (fan-out, scores) -----------

_MAX_REQUEST_BYTES = 8192


async def _answer(
    registry: Registry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if len(head) > _MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method != b"GET":
            status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif path == b"/metrics":
            status, body, ctype = "200 OK", registry.render().encode(), CONTENT_TYPE
        elif path == b"/healthz":
            status, body, ctype = "200 OK", b"ok\n", "text/plain"
        else:
            status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
        pass  # a half request or a port scan: nothing to answer
    except OSError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve(registry: Registry, host: str, port: int) -> asyncio.Server:
    """Start `GET /metrics` (and `/healthz`) on host:port; the caller closes the server."""
    server = await asyncio.start_server(
        lambda r, w: _answer(registry, r, w), host, port, limit=_MAX_REQUEST_BYTES
    )
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
