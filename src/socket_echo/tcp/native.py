"""The native TCP data path: tcp/_native.c's ready loop, under the one connection lifecycle.

The C engine owns the descriptors and moves the bytes in a thread of its own (epoll, recv,
send, held echoes, counters in C structs, admission against the table's limits); this module
turns what it reports (opened, closed, accept paused) into the lifecycle of
lifecycle.py: reasons, counters, log records, the sweep and the drain are the same code
as on the pure paths. Nothing here runs per message.

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
from socket_echo.lifecycle import ERROR, PEER_CLOSED, RESET, Connection, ListenerContext
from socket_echo.limits import DURATION_BUCKETS, ConnectionTable
from socket_echo.logs import RateLimitedLog

_native: Any
try:
    from socket_echo.tcp import _native  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:  # not built here
    _native = None

# the engine's event kinds and close causes (module constants: read once, not per event)
OPENED, CLOSED, GONE, REFUSED, PAUSED, C_RESET, C_ERROR = (
    (
        _native.OPENED,
        _native.CLOSED,
        _native.GONE,
        _native.REFUSED,
        _native.PAUSED,
        _native.RESET,
        _native.ERROR,
    )
    if _native
    else (0, 1, 2, 3, 4, 5, 6)
)


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

    Admission is in C, against the table's limits: ``set_others`` keeps it told how many of
    the table's connections are not its own. Without per-connection log lines
    (``want_peers`` False) a connection gets its Python object only when the table lists
    everything (limits.Unlisted: the sweep, the drain, a scrape); one that comes and goes in
    between is counted in a sum, told within a few milliseconds. With them, each opening is
    told at once (its log line needs the peer)."""

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
        self.accepting = True
        self._retry: asyncio.TimerHandle | None = None
        self.table = table
        self.core.set_table(table.fd_budget, table.max_connections, DURATION_BUCKETS)
        self.open_changed(len(table.open))
        table.unlisted.append(self)
        loop.add_reader(self.core.fileno(), self._ready)
        self.core.start()

    # limits.Unlisted
    def unlisted(self) -> int:
        """Open here and not in the table: ``open_count`` counts a connection until the
        engine closes it, the table until its close is heard, so the sum is exact."""
        return int(self.core.open_count()) - len(self.conns)

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

    def open_changed(self, listed: int) -> None:
        """The table's ``open`` changed (limits.ConnectionTable.admit/release): tell the C
        admission how many of them are not this engine's. A connection of ours enters
        ``conns`` before the table and leaves it first, so the difference is exact."""
        self.core.set_others(listed - len(self.conns))

    def add_listener(self, sock: socket.socket, ctx: ListenerContext) -> None:
        self.core.add_listener(sock.fileno(), len(self.contexts))
        self.contexts.append(ctx)
        ctx.table.on_close.append(self._resume_accepting)  # a descriptor just came free

    def stop_accepting(self) -> None:
        self.accepting = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.core.stop_accepting()

    def _pause_accepting(self) -> None:
        self.exhausted.note()
        if self._retry is None:
            self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
            if self.accepting:
                self.core.resume_accepting()

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
            elif kind == REFUSED:  # by the C admission
                _, over_cap, over_budget = event
                if over_cap:
                    self.table.rejected.note(over_cap)
                if over_budget:
                    self.table.out_of_descriptors.note(over_budget)
            elif kind == PAUSED:
                self._pause_accepting()

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
