"""The Protocol data path: an asyncio ``Protocol`` per connection, on any platform and loop.

Per message the path is ``data_received -> transport.write`` plus one integer add. It also
serves every connection that passes a gate first (TLS, PROXY), on every platform.

Flow control is uvicorn's: the transport's write high-water mark is ``--max-buffer``
(config.py says what it means on every path). Above it the loop calls ``pause_writing`` and
reading from that peer stops until its echo drains; one read already under way (at most
``LOOP_READ_SIZE``) can still land, so a connection holds at most ``max_buffer +
LOOP_READ_SIZE`` bytes. (A high-water mark of 0 is no option: the TLS transport pauses at
``size >= high``, so at 0 it pauses for ever.)
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from socket_echo.lifecycle import (
    PEER_CLOSED,
    Connection,
    ListenerContext,
    lost_reason,
    unacked_on,
)


class EchoProtocol(Connection, asyncio.Protocol):
    __slots__ = ("transport", "unsent", "writes_paused")

    def __init__(self, ctx: ListenerContext, peer: Any = None) -> None:
        Connection.__init__(self, ctx, peer)  # peer given: the client a PROXY header named
        self.unsent = 0
        self.writes_paused = False

    # -- the data path ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        self.bytes_in += len(data)

    def pause_writing(self) -> None:
        self.writes_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writes_paused = False
        self.drains += 1  # a draining reader is active even when it sends nothing
        self.transport.resume_reading()

    # -- per connection -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.peer is None:
            self.peer = transport.get_extra_info("peername")
        if not self.admit():
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=self.ctx.max_buffer)

    def eof_received(self) -> bool | None:
        # Half-close: keep the transport so the echo of what was sent can finish; close()
        # flushes the write buffer, then closes.
        self.give_reason(PEER_CLOSED)
        self.transport.close()
        return self.keep_open_after_eof()

    def keep_open_after_eof(self) -> bool | None:
        """True (keep the transport for what is owed), except over TLS: there the transport
        closes itself after EOF whatever we answer, and the stdlib loop warns on stderr if we
        answer True ("returning true from eof_received() has no effect when using ssl"),
        outside the log format."""
        return None if self.transport.get_extra_info("sslcontext") is not None else True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.give_reason(*lost_reason(exc))
        self.released(self.unsent)

    # -- asked by the sweep, the drain and the metrics ---------------------------------
    def held(self) -> int:
        return self.transport.get_write_buffer_size() if self.conn_id else 0

    def unacked(self) -> int:
        return unacked_on(self.transport.get_extra_info("socket"))

    def close(self, reason: str) -> None:
        self.give_reason(reason)
        self.closing = True
        self.transport.close()

    def abort(self, reason: str) -> None:
        self.give_reason(reason)
        self.unsent = self.transport.get_write_buffer_size()
        self.transport.abort()
