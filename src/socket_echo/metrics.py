"""Metrics and health: ``/metrics`` (Prometheus text format), ``/healthz``, ``/readyz``.

Counting stays off the per-message path: the data path only adds integers it adds anyway
(bytes in), per-connection counters are bumped once per connection, and this collector reads
them all when Prometheus scrapes (prometheus_client renders the text format). The HTTP side is
a few lines by hand: three fixed GET paths on their own port need no HTTP library, and it must
not log per request (health probes would flood the log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from socket_echo.config import HTTP_MAX_REQUEST, HTTP_REQUEST_TIMEOUT, METRICS_MAX_CONNECTIONS
from socket_echo.limits import DURATION_BUCKETS
from socket_echo.state import ServerState

Render = Callable[[], Awaitable[bytes]]  # the /metrics body, made when asked


class ServerCollector:
    """Reads :class:`ServerState` at scrape time: nothing else of the server."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        table = s.table
        unlisted = table.unlisted_by_listener()  # admitted by a native path, no object yet
        live = s.live_bytes(unlisted)  # bytes of open connections, read from their owners
        opened = CounterMetricFamily(
            "socket_echo_connections_opened",
            "Connections admitted, by listener.",
            labels=["listener"],
        )
        for listener in set(table.by_listener) | set(unlisted):
            counters = table.by_listener.get(listener)
            n = unlisted.get(listener, (0, 0, 0))[0]
            opened.add_metric([listener], (counters.opened if counters else 0) + n)
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
            "socket_echo_connections_active", "Open connections.", value=table.count()
        )
        rejected = CounterMetricFamily(
            "socket_echo_connections_rejected",
            "Connections closed at once, by reason.",
            labels=["reason"],
        )
        rejected.add_metric(["max_connections"], table.rejected.count)
        rejected.add_metric(["descriptors"], table.out_of_descriptors.count)
        yield rejected
        yield GaugeMetricFamily("socket_echo_tasks", "asyncio tasks alive.", value=s.tasks())
        yield CounterMetricFamily(
            "socket_echo_accept_paused",
            "Times accepting paused on EMFILE/ENFILE/ENOBUFS/ENOMEM.",
            value=s.accept_paused.count,
        )
        moved = CounterMetricFamily(
            "socket_echo_bytes",
            "Bytes echoed, by listener and direction.",
            labels=["listener", "direction"],
        )
        for listener in set(table.by_listener) | set(live):
            done = table.by_listener.get(listener)
            done_in = done.bytes_in if done else 0
            done_out = done.bytes_out if done else 0
            live_in, live_out = live.get(listener, (0, 0))
            moved.add_metric([listener, "in"], done_in + live_in)
            moved.add_metric([listener, "out"], done_out + live_out)
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
        u = s.udp
        datagrams = CounterMetricFamily(
            "socket_echo_udp_datagrams", "UDP datagrams.", labels=["direction"]
        )
        d_in, d_out, b_in, b_out = u.totals()
        datagrams.add_metric(["in"], d_in)
        datagrams.add_metric(["out"], d_out)
        yield datagrams
        udp_bytes = CounterMetricFamily(
            "socket_echo_udp_bytes", "UDP payload bytes.", labels=["direction"]
        )
        udp_bytes.add_metric(["in"], b_in)
        udp_bytes.add_metric(["out"], b_out)
        yield udp_bytes
        yield GaugeMetricFamily(
            "socket_echo_udp_rate_buckets",
            "Source prefixes whose UDP rate is tracked (at most --udp-max-sources).",
            value=s.udp_guard.tracked_sources() if s.udp_guard else 0,
        )
        yield by_reason("socket_echo_udp_dropped", "UDP datagrams dropped, by reason.", u.drops())
        yield by_reason(
            "socket_echo_tls_handshake_failures",
            "Failed TLS, DTLS and QUIC handshakes, by reason.",
            s.tls.handshake_failures,
        )
        yield GaugeMetricFamily(
            "socket_echo_handshakes_in_progress",
            "TLS and QUIC handshakes begun and not yet done (--max-handshakes per listener).",
            value=s.tls.handshakes(),
        )
        yield CounterMetricFamily(
            "socket_echo_dtls_hello_verify_requests",
            "dtls://: HelloVerifyRequests sent (cookies asked for; nothing kept for the source).",
            value=s.tls.hello_verify_requests,
        )
        applied = CounterMetricFamily(
            "socket_echo_impairments",
            "Impairments applied on purpose (listener ?delay=...), by listener and kind.",
            labels=["listener", "kind"],
        )
        for (listener, kind), n in sorted(s.impairments.items()):
            applied.add_metric([listener, kind], n)
        yield applied
        yield by_reason(
            "socket_echo_proxy_rejected",
            "Connections closed for their PROXY header, by reason.",
            s.proxy.rejected,
        )


def by_reason(name: str, doc: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["reason"])
    for reason, n in counts.items():
        family.add_metric([reason], n)
    return family


def registry_for(state: ServerState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(state))
    return registry


def render_registry(registry: CollectorRegistry) -> Render:
    async def render() -> bytes:
        return generate_latest(registry)

    return render


def health_factory(
    registry: CollectorRegistry | Render, ready: Callable[[], str], loop: asyncio.AbstractEventLoop
) -> Callable[[], HealthHttp]:
    """The protocol factory of one metrics endpoint: its connections share one bound."""
    connections: dict[HealthHttp, None] = {}  # open ones, oldest first
    return lambda: HealthHttp(registry, ready, loop, connections)


class HealthHttp(asyncio.Protocol):
    """One GET per connection, answered and closed. ``/metrics`` comes from ``render`` (a
    registry, or the supervisor's sum over its workers, made without blocking the loop)."""

    def __init__(
        self,
        registry: CollectorRegistry | Render,
        ready: Callable[[], str],  # "" when ready, else why not
        loop: asyncio.AbstractEventLoop,
        connections: dict[HealthHttp, None],
    ) -> None:
        self.connections = connections  # the endpoint's, at most METRICS_MAX_CONNECTIONS
        self.render = (
            render_registry(registry) if isinstance(registry, CollectorRegistry) else registry
        )
        self.ready = ready
        self.loop = loop
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # At most METRICS_MAX_CONNECTIONS at once (idle ones must not take the server's
        # descriptors): a new one pushes out the oldest that has not asked anything yet, so
        # idle connections cannot keep a liveness probe out either.
        if len(self.connections) >= METRICS_MAX_CONNECTIONS:
            idle = next((c for c in self.connections if not c.answering), None)
            if idle is None:
                self.transport.abort()
                return
            self.connections.pop(idle)
            assert idle.transport is not None
            idle.transport.abort()
        self.connections[self] = None
        self.timer = self.loop.call_later(HTTP_REQUEST_TIMEOUT, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        """At most HTTP_MAX_REQUEST bytes are kept; once the request is complete (or too
        long) reading stops while the answer is made (a scrape of a stopped worker waits
        seconds): what the peer sends after it stays in the kernel's buffers, not ours."""
        if self.answering:
            return
        self.buf += data[: HTTP_MAX_REQUEST + 1 - len(self.buf)]
        if b"\r\n\r\n" in self.buf or b"\n\n" in self.buf or len(self.buf) > HTTP_MAX_REQUEST:
            self.answering = True
            assert self.transport is not None
            self.transport.pause_reading()
            self.loop.create_task(self._answer())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.connections.pop(self, None)

    async def _answer(self) -> None:
        assert self.transport is not None
        parts = self.buf.split(b"\r\n", 1)[0].split()
        path = parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""
        ctype = "text/plain; charset=utf-8"
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            code, body = "405 Method Not Allowed", b"GET only\n"
        elif path == b"/metrics":
            code, body, ctype = "200 OK", await self.render(), CONTENT_TYPE_LATEST
        elif path == b"/healthz":
            code, body = "200 OK", b"ok\n"
        elif path == b"/readyz":
            code, body = (
                ("200 OK", b"ready\n")
                if not (why := self.ready())
                else ("503 Service Unavailable", why.encode() + b"\n")
            )
        else:
            code, body = "404 Not Found", b"/metrics, /healthz, /readyz\n"
        head = (
            f"HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        if self.transport.is_closing():
            return
        self.transport.write(head + (b"" if parts[:1] == [b"HEAD"] else body))
        self.transport.close()
        self.buf = b""
