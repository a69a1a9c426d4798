"""The TCP echo protocol: the data path.

Per message the path is ``data_received -> transport.write`` plus one integer add. Flow
control is uvicorn's: the transport's write high-water mark is ``--max-buffer``; above it the
loop calls ``pause_writing`` and we stop reading from that peer until its echo drains.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from socket_echo.limits import ConnectionTable
from socket_echo.logs import log_event


class ConnectionContext:
    """What every connection of one listener shares: one pointer per connection."""

    def __init__(
        self,
        table: ConnectionTable,
        listener: str,
        max_buffer: int,
        access_log: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.table = table
        self.listener = listener
        self.max_buffer = max_buffer
        self.access_log = access_log
        self.loop = loop
        self.draining = False


def format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on the dual-stack socket
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer) if peer else "local socket"  # a Unix-socket peer has no address


class EchoProtocol(asyncio.Protocol):
    __slots__ = (
        "active_since",
        "bytes_in",
        "close_reason",
        "conn_id",
        "ctx",
        "drains",
        "opened_at",
        "peer",
        "seen_activity",
        "transport",
        "unsent",
        "writes_paused",
    )

    def __init__(self, ctx: ConnectionContext, peer: Any = None) -> None:
        self.ctx = ctx
        self.peer = peer  # given: the client address a PROXY header named
        self.conn_id = 0  # 0 = not admitted
        self.bytes_in = 0
        self.drains = 0
        self.seen_activity = 0
        self.active_since = 0.0
        self.unsent = 0
        self.writes_paused = False
        self.close_reason = ""

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
        ctx = self.ctx
        self.opened_at = now = ctx.loop.time()
        if self.peer is None:
            self.peer = transport.get_extra_info("peername")
        if ctx.draining or not ctx.table.admit(self, now, ctx.listener):
            self.transport.abort()
            return
        self.conn_id = ctx.table.opened
        self.transport.set_write_buffer_limits(high=ctx.max_buffer)
        if ctx.access_log:
            log_event(
                logging.INFO,
                "connection_open",
                f"connection #{self.conn_id} from {format_peer(self.peer)}",
                **self._fields(),
            )

    def eof_received(self) -> bool:
        # Half-close: keep the transport so the echo of what was sent can finish; close()
        # flushes the write buffer, then closes.
        self.close_reason = self.close_reason or "peer closed"
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.conn_id:
            return
        reason = self.close_reason or (f"error: {exc}" if exc else "peer closed")
        bytes_out = self.bytes_in - self.unsent
        ctx = self.ctx
        duration = ctx.loop.time() - self.opened_at
        ctx.table.release(
            self, reason.split(":")[0], self.bytes_in, bytes_out, ctx.listener, duration
        )
        if ctx.access_log:
            log_event(
                logging.INFO,
                "connection_close",
                f"connection #{self.conn_id} from {format_peer(self.peer)} closed: {reason}; "
                f"in {self.bytes_in} B, out {bytes_out} B, {duration:.3f} s",
                **self._fields(),
                bytes_in=self.bytes_in,
                bytes_out=bytes_out,
                duration=round(duration, 6),
                reason=reason,
            )

    def _fields(self) -> dict[str, Any]:
        return {"conn": self.conn_id, "listener": self.ctx.listener, "peer": format_peer(self.peer)}

    @property
    def listener(self) -> str:
        return self.ctx.listener

    # -- called by the sweep and by shutdown -------------------------------------------
    def activity(self) -> int:
        return self.bytes_in + self.drains

    def idle_expired(self) -> None:
        if self.writes_paused:
            self.abort("write stalled")  # the peer stopped reading: its echo cannot drain
        else:
            self.close("idle timeout")

    def close(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self.transport.close()

    def abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self.unsent = self.transport.get_write_buffer_size()
        self.transport.abort()
