"""Who a UDP echo may answer, and how often: the reflection guard and the rate limits.

UDP echo is a reflection vector (CVE-1999-0103, VU#417980): a spoofed source makes the server
attack a third party, or two echo services ping-pong forever. As inetd on the BSDs does, never
answer a datagram from port 0, a port below 1024 (unless allowed, for labs), 2049 (NFS), or a
port this server listens on; nor from a multicast, broadcast, unspecified or otherwise martian
address, IPv4-mapped forms included. Past that, a token bucket per source prefix (/24, /56)
and a global one cap the rate; the bucket table is bounded (least recently used goes first), so
a spoofed flood from many prefixes cannot grow memory. Excess is dropped, never queued.

Everything here is pure (no I/O) so tests can drive it directly; per datagram the cost is a
dict lookup (addresses are classified once and cached) and a little arithmetic.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from socket_echo.config import DEFAULT_UDP_MAX_SOURCES

NFS_PORT = 2049

# Why a datagram was not echoed: the label of socket_echo_udp_dropped_total{reason}, one name
# per cause on every UDP data path. REASONS is in the order of udp/_native.c's REASONS array
# (tests/test_udp.py holds the two equal).
FORBIDDEN_PORT = "forbidden source port"
PRIVILEGED_PORT = "privileged source port"
MARTIAN = "martian source"
MULTICAST = "multicast source"
BROADCAST = "broadcast source"
SOURCE_RATE = "source rate limit"
GLOBAL_RATE = "global rate limit"
SEND_FULL = "send buffer full"
SEND_ERROR = "send error"
RECEIVE_ERROR = "receive error"
REASONS = (
    FORBIDDEN_PORT, PRIVILEGED_PORT, MARTIAN, MULTICAST, BROADCAST,
    SOURCE_RATE, GLOBAL_RATE, SEND_FULL, SEND_ERROR, RECEIVE_ERROR,
)  # fmt: skip
BUCKETS = DEFAULT_UDP_MAX_SOURCES  # rate-limit buckets kept; least recently used go first

V4_MARTIANS = [
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32")
]
V6_MARTIANS = [ipaddress.ip_network(n) for n in ("::/128", "ff00::/8", "::/96")]


def classify(host: str) -> tuple[str | None, str]:
    """(drop reason or None, rate-limit prefix key) for a source address text."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return MARTIAN, host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is judged as a.b.c.d
    if isinstance(ip, ipaddress.IPv4Address):
        if ip.is_multicast:
            return MULTICAST, ""
        if any(ip in net for net in V4_MARTIANS):
            return (BROADCAST if ip == ipaddress.IPv4Address("255.255.255.255") else MARTIAN), ""
        return None, str(ipaddress.ip_network(f"{ip}/24", strict=False).network_address)
    if ip.is_multicast:
        return MULTICAST, ""
    if ip.is_unspecified or (ip in V6_MARTIANS[2] and not ip.is_loopback):  # ::/96 but ::1
        return MARTIAN, ""
    return None, str(ipaddress.ip_network(f"{ip}/56", strict=False).network_address)


class TokenBucket:
    """Tokens refill continuously at ``rate`` up to ``burst``. Callers refill only when the
    clock moved (``last != now``): within one batch of datagrams a take is one subtraction."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def refill(self, now: float) -> None:
        tokens = self.tokens + (now - self.last) * self.rate
        self.tokens = self.burst if tokens > self.burst else tokens
        self.last = now


class UdpGuard:
    """Per datagram: the port checks, one dict lookup (source address -> its prefix's bucket,
    or the reason it is never answered) and a token subtraction. The tables are bounded
    without per-datagram bookkeeping: when one is full, the least recently used tenth goes
    (amortized over thousands of datagrams).

    Source addresses are cached under any hashable key: the text form or the raw
    address bytes (the batched Linux path in udp/mmsg.py, which never builds text
    for a known source)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        max_rate: float,
        allow_privileged_ports: bool = False,
        own_ports: frozenset[int] = frozenset(),
        max_sources: int = BUCKETS,
    ) -> None:
        self.max_sources = max_sources  # buckets kept; as many source addresses cached
        self.rate = rate
        self.burst = burst
        self.min_port = 1 if allow_privileged_ports else 1024
        self.forbidden_ports = frozenset({0, NFS_PORT, *own_ports})
        self.global_bucket = TokenBucket(max_rate, max(1.0, max_rate), 0.0)  # 1 s of burst
        self.buckets: dict[str, TokenBucket] = {}  # prefix -> bucket
        self.sources: dict[object, TokenBucket | str] = {}  # address -> bucket or drop reason
        self._native: object | None = None  # the C twin (udp/_native.c), made when asked

    def native(self) -> Any:
        """The C twin of this guard, with the same rules and parameters, shared by every
        socket on the native UDP path. Once it exists, :meth:`check` asks it too, so every
        path of the process (native, impaired, QUIC, DTLS) draws on one table of prefixes
        and one global bucket: --udp-max-rate is over all sources, not per path. The twins'
        verdicts are held equal by tests on separate instances."""
        if self._native is None:
            from socket_echo.udp.native import new_guard

            self._native = new_guard(
                self.rate,
                self.burst,
                self.global_bucket.rate,
                self.min_port,
                self.forbidden_ports,
                self.max_sources,
            )
        return self._native

    def tracked_sources(self) -> int:
        """Source prefixes whose rate is tracked, on every path."""
        return len(self.buckets) + (int(self._native.sources) if self._native else 0)  # type: ignore[attr-defined]

    def check(self, key: str | bytes, port: int, now: float, family: int = 0) -> str | None:
        """One datagram from (``key``, port) at ``now``: None to answer, else the reason to
        drop. The source is given as text, or as raw address bytes of ``family`` (the
        batched path: a known source is never turned into text). The one place the rules are
        applied, for every UDP path (through the C twin once there is one)."""
        if self._native is not None:
            return self._check_native(key, port, now, family)
        if port in self.forbidden_ports:
            return FORBIDDEN_PORT
        if port < self.min_port:
            return PRIVILEGED_PORT
        bucket = self.sources.get(key)
        if bucket is None:
            host = key if isinstance(key, str) else socket.inet_ntop(family, key)
            bucket = self.learn(key, host, now)
        if isinstance(bucket, str):
            return bucket
        if bucket.last != now:
            bucket.refill(now)
        if bucket.tokens < 1.0:
            return SOURCE_RATE
        total = self.global_bucket
        if total.last != now:
            total.refill(now)
        if total.tokens < 1.0:
            return GLOBAL_RATE
        bucket.tokens -= 1.0
        total.tokens -= 1.0
        return None

    def _check_native(self, key: str | bytes, port: int, now: float, family: int) -> str | None:
        if isinstance(key, str):
            host = key.split("%", 1)[0]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                key = socket.inet_pton(family, host)
            except OSError:
                return MARTIAN
        verdict: str | None = self._native.check(key, family, port, now)  # type: ignore[union-attr]
        return verdict

    def learn(self, key: object, host: str, now: float) -> TokenBucket | str:
        """Classify a new source address and cache the outcome under ``key``."""
        reason, prefix = classify(host)
        if len(self.sources) >= self.max_sources:
            self.sources.clear()
        if reason is not None:
            self.sources[key] = reason
            return reason
        bucket = self.buckets.get(prefix)
        if bucket is None:
            if len(self.buckets) >= self.max_sources:
                self._evict()
            bucket = self.buckets[prefix] = TokenBucket(self.rate, self.burst, now)
        self.sources[key] = bucket
        return bucket

    def _evict(self) -> None:
        """Drop the least recently used tenth of the buckets (and the addresses on them)."""
        oldest = sorted(self.buckets.items(), key=lambda item: item[1].last)
        gone = {id(b) for _, b in oldest[: max(1, len(oldest) // 10)]}
        self.buckets = {p: b for p, b in self.buckets.items() if id(b) not in gone}
        self.sources = {h: b for h, b in self.sources.items() if id(b) not in gone}
