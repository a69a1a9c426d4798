"""Which UDP data path serves a UDP socket here (``--udp-io``), and serving it. Apart from
the package's ``__init__`` so importing the guard or one path loads no other."""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from socket_echo.config import ConfigError
from socket_echo.state import UdpStats
from socket_echo.udp import mmsg, native
from socket_echo.udp.guard import UdpGuard
from socket_echo.udp.loop import UdpEcho


class UdpServing(Protocol):
    def close(self) -> None: ...


def resolve_udp_io(name: str) -> str:
    """``--udp-io``: the UDP data path here; ConfigError (one line) if it cannot run here."""
    if name == "native" and not native.available():
        raise ConfigError(
            "--udp-io native: the compiled extension is not available here "
            "(or SOCKET_ECHO_NO_EXTENSIONS is set): use --udp-io mmsg or loop"
        )
    if name == "mmsg" and not mmsg.available():
        raise ConfigError("--udp-io mmsg: this platform has no recvmmsg (use --udp-io loop)")
    if name == "auto":
        if native.available():
            return "native"
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
    path = resolve_udp_io(io)
    if path == "native":
        return native.NativeUdpEcho(loop, sock, guard.native(), stats)
    if path == "mmsg":
        return mmsg.MmsgUdpEcho(loop, sock, guard, stats)
    return UdpEcho(loop, sock, guard, stats)
