"""The native TCP data path: tcp/_native.c's ready loop, under the one connection lifecycle.

The C engine owns the descriptors and moves the bytes (epoll, recv, send, held echoes,
counters in C structs); this module turns what it reports (opened, closed, accept paused)
into the lifecycle of tcp/lifecycle.py: admission, reasons, counters, log records, the sweep
and the drain are the same code as on the pure paths. Nothing here runs per message.

``available()`` is False where the extension was not built (no compiler, not Linux, or
``SOCKET_ECHO_NO_EXTENSIONS=1`` at install time) or when ``SOCKET_ECHO_NO_EXTENSIONS=1`` is
set at run time (the aiohttp/yarl convention); the pure paths then serve.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from socket_echo.config import ACCEPT_RETRY_DELAY, READ_CHUNK
from socket_echo.limits import DURATION_BUCKETS, ConnectionTable
from socket_echo.logs import RateLimitedLog
from socket_echo.tcp.lifecycle import ERROR, PEER_CLOSED, RESET, Connection, ListenerContext

_native: Any
try:
    from socket_echo.tcp import _native  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:  # not built here
    _native = None

NO_EXTENSIONS = "SOCKET_ECHO_NO_EXTENSIONS"
# the engine's event kinds and close causes (module constants: read once, not per event)
OPENED, CLOSED, GONE, REFUSED, C_RESET, C_ERROR = (
    (_native.OPENED, _native.CLOSED, _native.GONE, _native.REFUSED, _native.RESET, _native.ERROR)
    if _native
    else (0, 1, 2, 3, 4, 5)
)


def available() -> bool:
    return _native is not None and not os.environ.get(NO_EXTENSIONS)


def why_unavailable() -> str:
    if os.environ.get(NO_EXTENSIONS):
        return f"{NO_EXTENSIONS} is set"
    return "the compiled extension is not installed (no compiler at install time, or not Linux)"


class NativeConnection(Connection):
    """``bytes_in`` is counted in C while the connection is open (``received`` asks for it)
    and set from the close event: a plain attribute, no property, on the per-connection path."""

    __slots__ = ("engine", "fd")

    def __init__(self, engine: NativeEngine, fd: int, peer: Any, ctx: ListenerContext) -> None:
        self.engine = engine
        self.fd = fd  # -1 once the engine has let it go
        super().__init__(ctx, peer)

    def received(self) -> int:
        return int(self.engine.c.bytes_in(self.fd)) if self.fd >= 0 else self.bytes_in

    def activity(self) -> int:
        return int(self.engine.c.activity(self.fd)) if self.fd >= 0 else 0

    def held(self) -> int:
        return int(self.engine.c.held(self.fd)) if self.fd >= 0 else 0

    def close(self, reason: str) -> None:
        self.give_reason(reason)
        self.closing = True
        if self.fd >= 0:
            self.engine.c.close(self.fd)

    def abort(self, reason: str) -> None:
        self.give_reason(reason)
        self.engine.abort(self)


class NativeEngine:
    """Drives one C engine on the running loop: one reader callback on its epoll descriptor."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_buffer: int,
        exhausted: RateLimitedLog,
        want_peers: bool = True,
        table: ConnectionTable | None = None,
    ) -> None:
        """``table``: admit in C against it and make a connection's object only when the
        table lists everything (limits.Unlisted); a connection that comes and goes between
        two listings (churn) costs Python one call, at its close. Without per-connection log
        lines only (``want_peers`` False): a log line needs the object from the start."""
        self.loop = loop
        self.exhausted = exhausted
        self.c = _native.Engine(max(1, min(READ_CHUNK, max_buffer)), want_peers)
        self.conns: dict[int, NativeConnection] = {}
        self.contexts: list[ListenerContext] = []
        self.accepting = True
        self._retry: asyncio.TimerHandle | None = None
        if table is not None and not want_peers:
            self.c.set_lazy(table.open, table.limit, table.max_connections, DURATION_BUCKETS)
            table.unlisted.append(self)
        self.table = table
        loop.add_reader(self.c.fileno(), self._ready)

    def unlisted(self) -> int:
        return int(self.c.unlisted())

    def list_unlisted(self) -> None:
        conns, contexts = self.conns, self.contexts
        for fd, tag, opened_at in self.c.take_unlisted():
            conn = conns[fd] = NativeConnection(self, fd, None, contexts[tag])
            conn.admit(opened_at, listed_late=True)

    def add_listener(self, sock: socket.socket, ctx: ListenerContext) -> None:
        self.c.add_listener(sock.fileno(), len(self.contexts))
        self.contexts.append(ctx)
        ctx.table.on_close.append(self._resume_accepting)  # a descriptor just came free

    def stop_accepting(self) -> None:
        self.accepting = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.c.stop_accepting()

    def _pause_accepting(self) -> None:
        self.exhausted.note()
        if self._retry is None:
            self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
            if self.accepting:
                self.c.resume_accepting()

    def _ready(self) -> None:
        events = self.c.run()
        if events is None:
            return
        # Runs once per wake-up, for every connection opened or closed (churn): one clock
        # reading per batch, the reasons set without a call.
        conns, contexts = self.conns, self.contexts
        now = self.loop.time()
        for event in events:
            kind = event[0]
            if kind == OPENED:
                _, fd, tag, peer = event
                conn = NativeConnection(self, fd, peer, contexts[tag])
                if conn.admit(now):
                    conns[fd] = conn
                else:
                    self.c.abort(fd)
            elif kind == CLOSED:
                _, fd, why, err, bytes_in, unsent = event
                done = conns.pop(fd, None)
                if done is None:
                    continue
                done.fd = -1
                done.bytes_in = bytes_in
                if not done.reason:
                    if why == C_RESET:
                        done.reason = RESET
                    elif why == C_ERROR:
                        done.reason, done.detail = ERROR, os.strerror(err)
                    else:
                        done.reason = PEER_CLOSED
                done.released(unsent, now)
            elif kind == GONE:  # never listed, summed in C per listener: counted in and out
                _, tag, n, (peers, resets, errors), bytes_in, bytes_out, buckets, spent = event
                ctx = contexts[tag]
                reasons = {PEER_CLOSED: peers, RESET: resets, ERROR: errors}
                ctx.table.count_gone(ctx.listener, n, reasons, bytes_in, bytes_out, buckets, spent)
            elif kind == REFUSED:  # by the C admission (lazy mode)
                _, over_cap, over_budget = event
                if over_cap and self.table is not None:
                    self.table.rejected.note(over_cap)
                if over_budget and self.table is not None:
                    self.table.out_of_descriptors.note(over_budget)
            elif kind == _native.PAUSED:
                self._pause_accepting()

    def abort(self, conn: NativeConnection) -> None:
        if conn.fd < 0:
            return
        result = self.c.abort(conn.fd)
        self.conns.pop(conn.fd, None)
        conn.fd = -1
        if result is not None:
            conn.bytes_in, unsent = result
            conn.released(unsent)

    def shutdown(self) -> None:
        self.loop.remove_reader(self.c.fileno())
        self.c.shutdown()
