"""The plain-TCP data path on Linux: a nested epoll inside the running event loop.

Why by hand: on this machine class a uvloop ``Protocol`` echo costs ~1 µs of Python per
message for the loop's dispatch alone (0.88x the req/s of a C epoll echo, benchmarks/). Here
every connection is registered in our own ``select.epoll`` whose one descriptor sits in the
event loop; when it is readable, one callback serves every ready connection in a tight loop
(``recv_into`` a shared buffer, ``send`` it back). Timers, signals and everything else stay in
the loop, and the same code runs on uvloop and on the stdlib loop.

Per connection the rules are the Protocol path's: bytes go back as they arrive; while an echo
cannot be sent in full the rest is held and reading from that peer stops (level-triggered
EPOLLOUT until it drains). A read takes at most ``min(READ_CHUNK, --max-buffer)`` bytes, so a
connection never holds more than ``--max-buffer``. EOF closes once everything was sent; the
table's sweep closes idle and stalled ones. Admission, reasons, counters and log records are
the one lifecycle of lifecycle.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from typing import Any

from socket_echo.config import ACCEPT_RETRY_DELAY, READ_CHUNK
from socket_echo.lifecycle import (
    LINGER_ABORT,
    PEER_CLOSED,
    Connection,
    ListenerContext,
    lost_reason,
    unacked_on,
)
from socket_echo.logs import RateLimitedLog
from socket_echo.tcp.accept import accept_batch

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


def available() -> bool:
    return hasattr(select, "epoll")


class EpollConnection(Connection):
    __slots__ = ("engine", "fd", "pending", "sock")

    def __init__(
        self, engine: EpollEngine, sock: socket.socket, peer: Any, ctx: ListenerContext
    ) -> None:
        super().__init__(ctx, peer)
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.pending: memoryview | None = None  # echo bytes the kernel would not take yet

    def held(self) -> int:
        return len(self.pending) if self.pending is not None else 0

    def unacked(self) -> int:
        return unacked_on(self.sock)

    def close(self, reason: str) -> None:
        self.engine.close(self, reason)

    def abort(self, reason: str) -> None:
        self.engine.abort(self, reason)


class EpollEngine:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_buffer: int, exhausted: RateLimitedLog
    ) -> None:
        self.loop = loop
        self.exhausted = exhausted
        self.epoll = select.epoll()
        self.conns: dict[int, EpollConnection] = {}
        self.listeners: dict[int, tuple[socket.socket, ListenerContext]] = {}
        self.accepting = True
        self._accept_retry: asyncio.TimerHandle | None = None
        self._buf = bytearray(max(1, min(READ_CHUNK, max_buffer)))
        self._view = memoryview(self._buf)
        loop.add_reader(self.epoll.fileno(), self._ready)

    # -- listeners ----------------------------------------------------------------------
    def add_listener(self, sock: socket.socket, ctx: ListenerContext) -> None:
        self.listeners[sock.fileno()] = (sock, ctx)
        self.epoll.register(sock.fileno(), EPOLLIN)
        ctx.table.on_close.append(self._resume_accepting)  # a descriptor just came free

    def stop_accepting(self) -> None:
        self.accepting = False
        if self._accept_retry is not None:
            self._accept_retry.cancel()
        for fd in self.listeners:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)

    def _pause_accepting(self) -> None:
        for fd in self.listeners:
            self.epoll.modify(fd, 0)
        self._accept_retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
        self.exhausted.note()

    def _resume_accepting(self) -> None:
        if self._accept_retry is not None and self.accepting:
            self._accept_retry.cancel()
            self._accept_retry = None
            for fd in self.listeners:
                self.epoll.modify(fd, EPOLLIN)

    def _accept(self, lsock: socket.socket, ctx: ListenerContext) -> None:
        def take(sock: socket.socket, peer: Any) -> None:
            conn = EpollConnection(self, sock, peer, ctx)
            if not conn.admit():
                sock.close()
                return
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, EPOLLIN)

        if not accept_batch(lsock, take):
            self._pause_accepting()

    # -- the data path ------------------------------------------------------------------
    def _ready(self) -> None:
        conns = self.conns
        buf = self._buf
        view = self._view
        recv_into = socket.socket.recv_into
        send = socket.socket.send
        for fd, _events in self.epoll.poll(0):
            conn = conns.get(fd)
            if conn is None:
                if fd in self.listeners and self.accepting:
                    self._accept(*self.listeners[fd])
                continue
            if conn.pending is not None:
                self._flush(conn)
                continue
            try:
                n = recv_into(conn.sock, buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                self._lost(conn, exc)
                continue
            if not n:
                self._finish(conn, PEER_CLOSED)
                continue
            if conn.closing:
                continue  # shutting down: what arrives now is not echoed
            conn.bytes_in += n
            try:
                sent = send(conn.sock, view[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._lost(conn, exc)
                continue
            if sent < n:
                conn.pending = memoryview(bytes(view[sent:n]))
                self.epoll.modify(fd, EPOLLOUT)  # stop reading until the echo drains

    def _flush(self, conn: EpollConnection) -> None:
        pending = conn.pending
        assert pending is not None
        try:
            sent = conn.sock.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(conn, exc)
            return
        if sent < len(pending):
            conn.pending = pending[sent:]
            return
        conn.pending = None
        conn.drains += 1
        if conn.closing:
            self._half_close(conn)
        else:
            self.epoll.modify(conn.fd, EPOLLIN)

    # -- closing ------------------------------------------------------------------------
    def _half_close(self, conn: EpollConnection) -> None:
        """Everything echoed: send FIN, then wait for the peer's close (reads are dropped)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            self.epoll.modify(conn.fd, EPOLLIN)
        except OSError as exc:
            self._lost(conn, exc)

    def close(self, conn: EpollConnection, reason: str) -> None:
        """Stop echoing, deliver what is already owed, then close (used by idle and drain)."""
        if conn.closing:
            return
        conn.give_reason(reason)
        conn.closing = True
        if conn.pending is None:
            self._half_close(conn)

    def abort(self, conn: EpollConnection, reason: str) -> None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
        self._finish(conn, reason)

    def _lost(self, conn: EpollConnection, exc: OSError) -> None:
        self._finish(conn, *lost_reason(exc))

    def _finish(self, conn: EpollConnection, reason: str, detail: str = "") -> None:
        if self.conns.pop(conn.fd, None) is None:
            return  # already finished
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(conn.fd)
        conn.sock.close()
        conn.give_reason(reason, detail)
        conn.released(conn.held())

    # -- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
