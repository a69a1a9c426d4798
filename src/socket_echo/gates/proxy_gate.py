"""PROXY-protocol gates: read the header, then echo as the real client's address.

The header must arrive within ``--proxy-header-timeout`` seconds (config.py; one timer per
connection, cancelled when the header is complete: not per message); a malformed, oversized
or missing one closes the connection, is counted by reason and logged. Bytes that came with
the header go to the echo, in order.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

from socket_echo.config import PROXY_HEADER_TIMEOUT
from socket_echo.gates.proxy import (
    CLOSED_EARLY,
    OVERSIZED,
    TIMEOUT,
    V1_MAX,
    V2_MAX,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)
from socket_echo.lifecycle import ERROR, ListenerContext, format_peer
from socket_echo.state import ProxyStats


def no_header_in(seconds: float) -> str:
    return f"no PROXY header within {seconds:g} s"


class ProxyGate(asyncio.Protocol):
    def __init__(
        self, ctx: ListenerContext, stats: ProxyStats, timeout: float = PROXY_HEADER_TIMEOUT
    ) -> None:
        self.ctx = ctx
        self.stats = stats
        self.timeout = timeout
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = self.ctx.loop.call_later(
            self.timeout, self._reject, TIMEOUT, no_header_in(self.timeout)
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            header = parse(self.buffer)
        except ProxyHeaderError as exc:
            self._reject(exc.reason, str(exc))
            return
        if header is None:
            if len(self.buffer) > V2_MAX:  # parse() bounds both versions; belt and braces
                self._reject(OVERSIZED, "oversized PROXY header")
            return
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        echo = self.ctx.new_echo(header.source)
        self.transport.set_protocol(echo)
        echo.connection_made(self.transport)
        rest = self.buffer[header.length :]
        self.buffer = b""
        if rest:
            echo.data_received(rest)

    def eof_received(self) -> bool:
        self._reject(CLOSED_EARLY, "closed before a complete PROXY header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _reject(self, reason: str, detail: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        peer = format_peer(self.transport.get_extra_info("peername"))
        self.transport.abort()
        self.stats.reject(self.ctx.listener, self.ctx.access_log, peer, reason, detail)


def gate_factory(
    ctx: ListenerContext, stats: ProxyStats, timeout: float = PROXY_HEADER_TIMEOUT
) -> Any:
    def factory() -> ProxyGate:
        return ProxyGate(ctx, stats, timeout)

    return factory


class HeaderPreReader:
    """``tls+proxy://``: reads exactly the PROXY header from a raw accepted socket, never a
    byte of what follows (the TLS ClientHello must reach the TLS layer intact), then hands the
    socket and the header on. A transport cannot do this: it reads whatever has arrived.

    How many bytes are safe to take is known from a peek: everything before v1's CRLF, and
    v2's 16 + length bytes, is header by definition."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        listener: str,
        stats: ProxyStats,
        access_log: bool,
        on_header: Callable[[socket.socket, ProxyHeader], None],
        timeout: float = PROXY_HEADER_TIMEOUT,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.listener = listener
        self.stats = stats
        self.access_log = access_log
        self.on_header = on_header
        self.buf = b""
        self.fd = sock.fileno()
        loop.add_reader(self.fd, self._readable)
        self.timer = loop.call_later(timeout, self._reject, TIMEOUT, no_header_in(timeout))

    def _safe_to_take(self) -> int:
        head = self.buf[:1] or self.sock.recv(1, socket.MSG_PEEK)
        if head == b"\r":  # v2: 16 bytes, then the length they announce
            if len(self.buf) < 16:
                return 16 - len(self.buf)
            return 16 + int.from_bytes(self.buf[14:16], "big") - len(self.buf)
        if head == b"P":  # v1: up to and including CRLF
            peek = self.sock.recv(V1_MAX - len(self.buf), socket.MSG_PEEK)
            end = (self.buf + peek).find(b"\r\n")
            return (end + 2 - len(self.buf)) if end >= 0 else max(1, len(peek))
        return 1  # not a header: one byte is enough for parse() to say so

    def _readable(self) -> None:
        try:
            data = self.sock.recv(max(1, min(self._safe_to_take(), V2_MAX)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._reject(ERROR, exc.strerror or str(exc))
            return
        if not data:
            self._reject(CLOSED_EARLY, "closed before a complete PROXY header")
            return
        self.buf += data
        try:
            header = parse(self.buf)
        except ProxyHeaderError as exc:
            self._reject(exc.reason, str(exc))
            return
        if header is None:
            return
        self._stop()
        self.on_header(self.sock, header)

    def _stop(self) -> None:
        self.timer.cancel()
        self.loop.remove_reader(self.fd)

    def _reject(self, reason: str, detail: str) -> None:
        self._stop()
        try:
            peer = format_peer(self.sock.getpeername())
        except OSError:
            peer = "unknown"
        self.sock.close()
        self.stats.reject(self.listener, self.access_log, peer, reason, detail)
