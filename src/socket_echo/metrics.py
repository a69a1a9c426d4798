"""Metrics and health: ``/metrics`` (Prometheus text format), ``/healthz``, ``/readyz``.

Counting stays off the per-message path: the data path only adds integers it adds anyway
(bytes in), per-connection counters are bumped once per connection, and this collector reads
them all when Prometheus scrapes (prometheus_client renders the text format). The HTTP side is
a few lines by hand: three fixed GET paths on their own port need no HTTP library, and it must
not log per request (health probes would flood the log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from socket_echo.limits import DURATION_BUCKETS

if TYPE_CHECKING:
    from socket_echo.server import EchoServer

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0


class ServerCollector:
    def __init__(self, server: EchoServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        table = s.table
        opened = CounterMetricFamily(
            "socket_echo_connections_opened",
            "Connections admitted, by listener.",
            labels=["listener"],
        )
        for listener, counters in table.by_listener.items():
            opened.add_metric([listener], counters.opened)
        yield opened
        closed = CounterMetricFamily(
            "socket_echo_connections_closed",
            "Connections closed, by listener and reason.",
            labels=["listener", "reason"],
        )
        for listener, counters in table.by_listener.items():
            for reason, n in counters.closed.items():
                closed.add_metric([listener, reason], n)
        yield closed
        yield GaugeMetricFamily(
            "socket_echo_connections_active", "Open connections.", value=len(table.open)
        )
        rejected = CounterMetricFamily(
            "socket_echo_connections_rejected",
            "Connections closed at once, by reason.",
            labels=["reason"],
        )
        rejected.add_metric(["max_connections"], table.rejected.count)
        rejected.add_metric(["descriptors"], table.out_of_descriptors.count)
        yield rejected
        tasks, timers = loop_load(s)
        yield GaugeMetricFamily("socket_echo_tasks", "asyncio tasks alive.", value=tasks)
        if timers is not None:  # uvloop does not tell
            yield GaugeMetricFamily(
                "socket_echo_timers", "Timers scheduled on the event loop.", value=timers
            )
        yield CounterMetricFamily(
            "socket_echo_accept_paused",
            "Times accepting paused on EMFILE/ENFILE/ENOBUFS/ENOMEM.",
            value=s.exhausted.count,
        )
        live: dict[str, int] = {}
        for conn in table.open:  # bytes of open connections, read at scrape time
            name = cast(Any, conn).listener
            live[name] = live.get(name, 0) + cast(Any, conn).bytes_in
        moved = CounterMetricFamily(
            "socket_echo_bytes",
            "Bytes echoed, by listener and direction.",
            labels=["listener", "direction"],
        )
        for listener in set(table.by_listener) | set(live):
            done = table.by_listener.get(listener)
            done_in = done.bytes_in if done else 0
            done_out = done.bytes_out if done else 0
            moved.add_metric([listener, "in"], done_in + live.get(listener, 0))
            moved.add_metric([listener, "out"], done_out + live.get(listener, 0))
        yield moved
        cumulative, buckets = 0, []
        for bound, count in zip(DURATION_BUCKETS, table.durations, strict=False):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", cumulative + table.durations[-1]))
        yield HistogramMetricFamily(
            "socket_echo_connection_duration_seconds",
            "How long closed connections lasted.",
            buckets=buckets,
            sum_value=table.duration_sum,
        )
        u = s.udp_stats
        datagrams = CounterMetricFamily(
            "socket_echo_udp_datagrams", "UDP datagrams.", labels=["direction"]
        )
        datagrams.add_metric(["in"], u.datagrams_in)
        datagrams.add_metric(["out"], u.datagrams_out)
        yield datagrams
        udp_bytes = CounterMetricFamily(
            "socket_echo_udp_bytes", "UDP payload bytes.", labels=["direction"]
        )
        udp_bytes.add_metric(["in"], u.bytes_in)
        udp_bytes.add_metric(["out"], u.bytes_out)
        yield udp_bytes
        yield GaugeMetricFamily(
            "socket_echo_udp_rate_buckets",
            "Source prefixes whose UDP rate is tracked (at most --udp-max-sources).",
            value=len(s.udp_guard.buckets) if s.udp_guard else 0,
        )
        yield by_reason("socket_echo_udp_dropped", "UDP datagrams dropped, by reason.", u.dropped)
        yield by_reason(
            "socket_echo_tls_handshake_failures",
            "Failed TLS handshakes, by reason.",
            s.tls_stats.handshake_failures,
        )
        yield by_reason(
            "socket_echo_proxy_rejected",
            "Connections closed for their PROXY header, by reason.",
            s.proxy_stats.rejected,
        )


def loop_load(server: EchoServer) -> tuple[int, int | None]:
    """Tasks alive and timers scheduled on the server's loop (the soak test watches them
    for leaks); None for the timers where the loop does not expose them (uvloop)."""
    loop = server.loop
    if loop is None:
        return 0, None
    timers = getattr(loop, "_scheduled", None)
    return len(asyncio.all_tasks(loop)), None if timers is None else len(timers)


def by_reason(name: str, doc: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason, n in counts.items():
        family.add_metric([reason], n)
    return family


def registry_for(server: EchoServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    return registry


class HealthHttp(asyncio.Protocol):
    """One GET per connection, answered and closed."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.loop = loop
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.loop.call_later(REQUEST_TIMEOUT, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf or b"\n\n" in self.buf or len(self.buf) > MAX_REQUEST:
            self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _answer(self) -> None:
        assert self.transport is not None
        parts = self.buf.split(b"\r\n", 1)[0].split()
        path = parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""
        ctype = "text/plain; charset=utf-8"
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            code, body = "405 Method Not Allowed", b"GET only\n"
        elif path == b"/metrics":
            code, body, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        elif path == b"/healthz":
            code, body = "200 OK", b"ok\n"
        elif path == b"/readyz":
            code, body = (
                ("200 OK", b"ready\n")
                if self.ready()
                else ("503 Service Unavailable", b"draining\n")
            )
        else:
            code, body = "404 Not Found", b"/metrics, /healthz, /readyz\n"
        head = (
            f"HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + (b"" if parts[:1] == [b"HEAD"] else body))
        self.transport.close()
        self.buf = b""
