"""The native UDP data path: udp/_native.c's recvmmsg/guard/sendmmsg loop on the event loop.

Per readiness event Python makes one call (``run(now)``); datagrams, bytes and drops are
counted in C and read when something reports them (ServerState.udp, metrics, the periodic
drop line). The guard's rules are udp/guard.py's, twinned in C; the tests hold the two to the
same verdicts. Unavailable (pure paths serve) where the extension was not built, or with
``SOCKET_ECHO_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from socket_echo import extensions
from socket_echo.state import UdpStats

_native: Any
try:
    from socket_echo.udp import _native  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:  # not built here
    _native = None


def available() -> bool:
    return _native is not None and not extensions.disabled()


def new_guard(
    rate: float,
    burst: float,
    max_rate: float,
    min_port: int,
    forbidden_ports: frozenset[int],
    max_sources: int,
) -> Any:
    return _native.Guard(rate, burst, max_rate, min_port, sorted(forbidden_ports), max_sources)


class NativeUdpEcho:
    """Serves one UDP socket (AF_INET, or AF_INET6 with IPv4-mapped clients) on the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, guard: Any, stats: UdpStats
    ) -> None:
        self.loop, self.sock = loop, sock
        self.c = _native.UdpEcho(sock.fileno(), int(sock.family), guard)
        stats.sources.append(self.c.counters)
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        self.c.run(self.loop.time())

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
