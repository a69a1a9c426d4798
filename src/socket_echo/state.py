"""What the server knows about itself, in one object: the one thing metrics.py reads.

The data paths and gates write plain counters here (integer adds, never per message where it
can be per batch or per connection); the collector reads them when Prometheus scrapes. No
private attribute of the server or of the event loop is read from outside.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from socket_echo.limits import ConnectionTable
from socket_echo.logs import RateLimitedLog, log_event

if TYPE_CHECKING:  # the guard's package imports this module
    from socket_echo.udp.guard import UdpGuard


def accept_paused_log() -> RateLimitedLog:
    return RateLimitedLog(
        "accept_paused",
        "out of file descriptors (or memory): accept paused {count} time(s); "
        "open connections go on, new ones wait in the backlog",
    )


class UdpStats:
    """Datagrams and bytes in and out, and drops by reason, over every UDP listener. The pure
    paths add to the attributes; native paths count in C and are read through ``sources``
    (each a callable giving (in, out, bytes in, bytes out, {reason: drops}))."""

    def __init__(self) -> None:
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped: Counter[str] = Counter()
        self.sources: list[Callable[[], tuple[int, int, int, int, dict[str, int]]]] = []
        self._reported: Counter[str] = Counter()

    def totals(self) -> tuple[int, int, int, int]:
        """(datagrams in, datagrams out, bytes in, bytes out) over every path."""
        din, dout, bin_, bout = self.datagrams_in, self.datagrams_out, self.bytes_in, self.bytes_out
        for source in self.sources:
            counts = source()
            din, dout, bin_, bout = (
                din + counts[0],
                dout + counts[1],
                bin_ + counts[2],
                bout + counts[3],
            )
        return din, dout, bin_, bout

    def drops(self) -> Counter[str]:
        total = Counter(self.dropped)
        for source in self.sources:
            total.update(source()[4])
        return total

    def report(self) -> None:
        """Log the drops since the last report, if any: one line, never one per datagram."""
        dropped = self.drops()
        new = dropped - self._reported
        if new:
            self._reported = dropped
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(new.items()))
            log_event(
                logging.WARNING,
                "udp_dropped",
                f"UDP datagrams dropped: {detail}",
                dropped=dict(new),
            )


class TlsStats:
    def __init__(self) -> None:
        self.handshake_failures: Counter[str] = Counter()  # TLS and DTLS, by reason
        self.hello_verify_requests = 0  # dtls://: cookies sent, nothing kept
        self.handshaking: list[Slots] = []  # each TLS and QUIC listener's

    def slots(self, limit: int) -> Slots:
        """A listener's bound on handshakes in progress (``--max-handshakes``)."""
        slots = Slots(limit)
        self.handshaking.append(slots)
        return slots

    def handshakes(self) -> int:
        """TLS and QUIC handshakes in progress over every listener."""
        return sum(slots.busy for slots in self.handshaking)


class Slots:
    """At most ``limit`` at once: handshakes in progress on one listener (one
    that never finishes holds its state and memory until the handshake timeout, so a flood
    must not hold more than this many)."""

    __slots__ = ("busy", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    def take(self) -> bool:
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1


class ProxyStats:
    """Refused PROXY headers, counted by reason; logged at most once a second (with how many
    went unlogged since), as every other rejection is: 2,000 bad headers were 2,000 lines."""

    LOG_INTERVAL = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.rejected: Counter[str] = Counter()
        self.clock = clock
        self.unlogged = 0
        self._last_line = float("-inf")

    def reject(
        self, listener: str, access_log: bool, peer: str, reason: str, detail: str = ""
    ) -> None:
        """Count a refused header by reason (the metric label) and log its detail."""
        self.rejected[reason] += 1
        self.unlogged += 1
        now = self.clock()
        if now - self._last_line < self.LOG_INTERVAL:
            return
        self._last_line = now
        more, self.unlogged = self.unlogged - 1, 0
        shown = detail or reason  # the detail names the cause in full
        log_event(
            logging.INFO if access_log else logging.DEBUG,
            "proxy_rejected",
            f"PROXY header from {peer} rejected: {shown}"
            + (f" ({more} more rejected since the last line)" if more else ""),
            listener=listener,
            peer=peer,
            reason=shown,
            count=more + 1,
        )


@dataclasses.dataclass
class ServerState:
    table: ConnectionTable
    accept_paused: RateLimitedLog = dataclasses.field(default_factory=accept_paused_log)
    udp: UdpStats = dataclasses.field(default_factory=UdpStats)
    tls: TlsStats = dataclasses.field(default_factory=TlsStats)
    proxy: ProxyStats = dataclasses.field(default_factory=ProxyStats)
    udp_guard: UdpGuard | None = None  # its table of source prefixes is bounded
    # impairments applied on purpose, by (listener, kind): delayed, reset, closed, dropped, ...
    impairments: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    accepting: bool = False  # /readyz: true from start until a drain begins
    loop: asyncio.AbstractEventLoop | None = None

    def tasks(self) -> int:
        """asyncio tasks alive on the server's loop (the soak test watches them for leaks)."""
        return len(asyncio.all_tasks(self.loop)) if self.loop is not None else 0

    def live_bytes(self, unlisted: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int]]:
        """(in, out) bytes of the connections still open, by listener: out is what was
        handed to the kernel, so it lags behind while a peer reads slowly. ``unlisted``: the
        table's unlisted_by_listener(), read once for the scrape."""
        live = {listener: (got, sent) for listener, (_, got, sent) in unlisted.items()}
        for conn in self.table.open:
            got, sent = live.get(conn.listener, (0, 0))
            received = conn.received()
            live[conn.listener] = (got + received, sent + received - conn.held())
        return live
