"""UDP echo (RFC 862) data paths: loop.py (recvfrom/sendto, any platform), mmsg.py
(recvmmsg/sendmmsg batches, Linux); guard.py decides whom to answer, for both."""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from socket_echo.config import ConfigError
from socket_echo.state import UdpStats
from socket_echo.udp import mmsg
from socket_echo.udp.guard import UdpGuard
from socket_echo.udp.loop import UdpEcho


class UdpServing(Protocol):
    def close(self) -> None: ...


def resolve_udp_io(name: str) -> str:
    """``--udp-io``: the UDP data path here; ConfigError (one line) if it cannot run here."""
    if name == "mmsg" and not mmsg.available():
        raise ConfigError("--udp-io mmsg: this platform has no recvmmsg (use --udp-io loop)")
    if name == "auto":
        return "mmsg" if mmsg.available() else "loop"
    return name


def serve_udp(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    guard: UdpGuard,
    stats: UdpStats,
    io: str = "auto",
) -> UdpServing:
    """Serve one UDP socket with the path ``io`` resolves to."""
    if resolve_udp_io(io) == "mmsg":
        return mmsg.MmsgUdpEcho(loop, sock, guard, stats)
    return UdpEcho(loop, sock, guard, stats)
