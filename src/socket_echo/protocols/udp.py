"""UDP echo (RFC 862): each datagram answered by one datagram with the same bytes.

A ``recvfrom_into``/``sendto`` loop on the event loop's ``add_reader``, the portable path:
measured here it costs less server CPU per datagram than a ``DatagramProtocol`` (uvloop's or
the stdlib's). On Linux, udp_mmsg.py batches the same work into recvmmsg/sendmmsg. The guard
(udp_guard.py) decides per datagram; a datagram that cannot be sent at once (kernel buffer
full) is dropped and counted, never queued. Drops are counted by reason and logged at most
once per ``REPORT_EVERY`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import Protocol

from socket_echo.config import ConfigError
from socket_echo.logs import log_event
from socket_echo.udp_guard import UdpGuard

MAX_DATAGRAM = 65535
BATCH = 64  # datagrams per readiness event at most: other work gets its turn
REPORT_EVERY = 10.0


class UdpStats:
    def __init__(self) -> None:
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def report(self) -> None:
        """Log the drops since the last report, if any: one line, never one per datagram."""
        new = self.dropped - self._reported
        if new:
            self._reported = self.dropped.copy()
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(new.items()))
            log_event(
                logging.WARNING,
                "udp_dropped",
                f"UDP datagrams dropped: {detail}",
                dropped=dict(new),
            )


class UdpEcho:
    """Serves one UDP socket on the running loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, guard: UdpGuard, stats: UdpStats
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.guard = guard
        self.stats = stats
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        view, buf, verdict = self._view, self._buf, self.guard.verdict
        recvfrom_into, sendto = self.sock.recvfrom_into, self.sock.sendto
        dropped = self.stats.dropped
        now = self.loop.time()
        n_in = b_in = n_out = b_out = 0  # added to the stats once per batch
        try:
            for _ in range(BATCH):
                try:
                    n, addr = recvfrom_into(buf)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:  # e.g. an ICMP error reported on the socket
                    dropped["receive error"] += 1
                    continue
                n_in += 1
                b_in += n
                reason = verdict(addr[0], addr[1], now)
                if reason is not None:
                    dropped[reason] += 1
                    continue
                try:
                    sendto(view[:n], addr)
                except (BlockingIOError, InterruptedError):
                    dropped["send buffer full"] += 1
                    continue
                except OSError:
                    dropped["send error"] += 1
                    continue
                n_out += 1
                b_out += n
        finally:
            stats = self.stats
            stats.datagrams_in += n_in
            stats.bytes_in += b_in
            stats.datagrams_out += n_out
            stats.bytes_out += b_out

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())


class UdpServing(Protocol):
    def close(self) -> None: ...


def serve_udp(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    guard: UdpGuard,
    stats: UdpStats,
    io: str = "auto",
) -> UdpServing:
    """Serve one UDP socket with the batched Linux path (udp_mmsg.py) or this portable loop."""
    from socket_echo.protocols import udp_mmsg  # it imports this module

    if use_mmsg(io):
        return udp_mmsg.MmsgUdpEcho(loop, sock, guard, stats)
    return UdpEcho(loop, sock, guard, stats)


def use_mmsg(io: str) -> bool:
    """``--udp-io``: whether recvmmsg/sendmmsg serve UDP; ConfigError if they cannot here."""
    from socket_echo.protocols import udp_mmsg

    if io == "mmsg" and not udp_mmsg.available():
        raise ConfigError("--udp-io mmsg: this platform has no recvmmsg (use --udp-io loop)")
    return io != "loop" and udp_mmsg.available()
