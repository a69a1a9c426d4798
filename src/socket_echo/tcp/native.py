"""The native TCP data path: tcp/_native.c's ready loop, under the one connection lifecycle.

The C engine owns its connections' whole life in a thread of its own: admission (a slot of
the process's one count, limits.open_count), the bytes (epoll, recv, send, held echoes,
splice), the idle/stall sweep (the table's rule, in C), close and abort, and their counters.
This module turns what it reports (opened, closed and why, sums of unlisted closes,
refusals, accept paused) into lifecycle.py's records and the table's counters, and pulls
(limits.Unlisted) when the drain or a scrape must see every connection. The table never
calls into it. Nothing here runs per message.

``available()`` is False where the extension was not built (no compiler, not Linux, or
``SOCKET_ECHO_NO_EXTENSIONS=1`` at install time) or when ``SOCKET_ECHO_NO_EXTENSIONS=1`` is
set at run time (the aiohttp/yarl convention); the pure paths then serve.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from socket_echo import extensions
from socket_echo.config import ACCEPT_RETRY_DELAY, READ_CHUNK
from socket_echo.lifecycle import (
    ERROR,
    IDLE,
    PEER_CLOSED,
    RESET,
    STALLED,
    Connection,
    ListenerContext,
)
from socket_echo.limits import DURATION_BUCKETS, ConnectionTable, sweep_interval
from socket_echo.logs import RateLimitedLog

_native: Any
try:
    from socket_echo.tcp import _native  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:  # not built here
    _native = None

# the engine's event kinds (module constants: read once, not per event)
OPENED, CLOSED, GONE, REFUSED, PAUSED = (
    (_native.OPENED, _native.CLOSED, _native.GONE, _native.REFUSED, _native.PAUSED)
    if _native
    else (0, 1, 2, 3, 4)
)
# why a connection closed, by the engine's R_* code (the GONE sums come in this order too)
REASONS = (PEER_CLOSED, RESET, ERROR, IDLE, STALLED)


def available() -> bool:
    return _native is not None and not extensions.disabled()


def why_unavailable() -> str:
    if extensions.disabled():
        return f"{extensions.NO_EXTENSIONS} is set"
    return "the compiled extension is not installed (no compiler at install time, or not Linux)"


class NativeConnection(Connection):
    """``bytes_in`` is counted in C while the connection is open (``received`` asks for it)
    and set from the close event: a plain attribute, no property, on the per-connection path.
    ``handle`` names it to the engine: its descriptor and a generation in one number, so a
    call made after the engine closed it (and maybe reused the descriptor) finds nothing."""

    __slots__ = ("engine", "handle")
    engine_owned = True  # admitted, swept and counted out by the engine

    def __init__(self, engine: NativeEngine, handle: int, peer: Any, ctx: ListenerContext) -> None:
        self.engine = engine
        self.handle = handle  # -1 once the engine has let it go
        super().__init__(ctx, peer)

    def received(self) -> int:
        return int(self.engine.core.bytes_in(self.handle)) if self.handle >= 0 else self.bytes_in

    def activity(self) -> int:
        return int(self.engine.core.activity(self.handle)) if self.handle >= 0 else 0

    def held(self) -> int:
        return int(self.engine.core.held(self.handle)) if self.handle >= 0 else 0

    def close(self, reason: str) -> None:
        self.give_reason(reason)
        self.closing = True
        if self.handle >= 0:
            self.engine.core.close(self.handle)

    def abort(self, reason: str) -> None:
        self.give_reason(reason)
        self.engine.abort(self)


class NativeEngine:
    """Drives one C engine (its own thread) from the running loop: one reader callback on
    the descriptor it signals when it has something to tell.

    Admission is in C, a slot of the table's count (shared with every other path), and so
    is the sweep. Without per-connection log lines (``want_peers`` False) a connection gets
    its Python object only when the drain lists everything (limits.Unlisted); one that
    comes and goes is counted in a sum, told within a few milliseconds, and a scrape sums
    the open ones without listing them. With log lines, each opening is told at once (its
    log line needs the peer)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_buffer: int,
        exhausted: RateLimitedLog,
        table: ConnectionTable,
        want_peers: bool = True,
    ) -> None:
        self.loop = loop
        self.exhausted = exhausted
        self.core = _native.Engine(max(1, min(READ_CHUNK, max_buffer)), want_peers)
        self.conns: dict[int, NativeConnection] = {}  # by handle
        self.contexts: list[ListenerContext] = []
        self.table = table
        sweep_every = sweep_interval(table.idle_timeout) if table.idle_timeout > 0 else 0.0
        self.core.set_table(
            table.slots,
            table.fd_budget,
            table.max_connections,
            DURATION_BUCKETS,
            table.idle_timeout,
            sweep_every,
            ACCEPT_RETRY_DELAY,  # out of descriptors: accepting pauses this long (or to a close)
        )
        table.unlisted.append(self)
        loop.add_reader(self.core.fileno(), self._ready)
        self.core.start()

    # limits.Unlisted
    def list_unlisted(self) -> None:
        events, listed = self.core.take_all()
        self._handle(events)
        conns, contexts = self.conns, self.contexts
        for handle, tag, opened_at in listed:
            conn = conns[handle] = NativeConnection(self, handle, None, contexts[tag])
            conn.admit(opened_at, listed_late=True)

    def unlisted_by_listener(self) -> dict[str, tuple[int, int, int]]:
        """(connections, bytes in, bytes out) of the open unlisted ones, by listener, leaving
        them unlisted; what the engine had not told yet is heard first."""
        events, sums = self.core.unlisted_sums()  # one snapshot: a close is in one or the other
        self._handle(events)
        contexts = self.contexts
        return {contexts[tag].listener: (n, got, sent) for tag, n, got, sent in sums}

    def add_listener(self, sock: socket.socket, ctx: ListenerContext) -> None:
        self.core.add_listener(sock.fileno(), len(self.contexts))
        self.contexts.append(ctx)

    def stop_accepting(self) -> None:
        self.core.stop_accepting()

    def _ready(self) -> None:
        self._handle(self.core.take())

    def _handle(self, events: list[tuple[Any, ...]]) -> None:
        if not events:
            return
        # Runs once per signal from the engine, for every connection opened or closed that
        # Python hears of: one clock reading per batch, the reasons set without a call.
        conns, contexts = self.conns, self.contexts
        now = self.loop.time()
        for event in events:
            kind = event[0]
            if kind == OPENED:  # admitted in C; listed now for its log line
                _, handle, tag, peer, opened_at = event
                conn = conns[handle] = NativeConnection(self, handle, peer, contexts[tag])
                conn.admit(opened_at, listed_late=True)
            elif kind == CLOSED:
                _, handle, why, err, bytes_in, unsent = event
                done = conns.pop(handle, None)
                if done is None:
                    continue
                done.handle = -1
                done.bytes_in = bytes_in
                if not done.reason:
                    done.reason = REASONS[why]
                    if err:
                        done.detail = os.strerror(err)
                done.released(unsent, now)
            elif kind == GONE:  # never listed, summed in C per listener: counted in and out
                _, tag, n, by_reason, bytes_in, bytes_out, buckets, spent = event
                ctx = contexts[tag]
                reasons = dict(zip(REASONS, by_reason, strict=True))
                ctx.table.count_gone(ctx.listener, n, reasons, bytes_in, bytes_out, buckets, spent)
            elif kind == REFUSED:  # by the C admission
                _, over_cap, over_budget = event
                if over_cap:
                    self.table.rejected.note(over_cap)
                if over_budget:
                    self.table.out_of_descriptors.note(over_budget)
            elif kind == PAUSED:  # the engine resumes by itself (a close, or the delay)
                self.exhausted.note()

    def abort(self, conn: NativeConnection) -> None:
        if conn.handle < 0:
            return
        result = self.core.abort(conn.handle)
        if result is None:  # the engine closed it already: its close event releases it
            return
        del self.conns[conn.handle]
        conn.handle = -1
        conn.bytes_in, unsent = result
        conn.released(unsent)

    def shutdown(self) -> None:
        """Stop the thread, hear what it had not told yet, then close what is left."""
        self.loop.remove_reader(self.core.fileno())
        self.core.stop()
        self._handle(self.core.take())
        self.core.shutdown()
