"""The plain-TCP data path on Linux: a nested epoll inside the running event loop.

Why by hand: on this machine class a uvloop ``Protocol`` echo costs ~1 µs of Python per
message for the loop's dispatch alone (0.88x the req/s of a C epoll echo, benchmarks/). Here
every connection is registered in our own ``select.epoll`` whose one descriptor sits in the
event loop; when it is readable, one callback serves every ready connection in a tight loop
(``recv_into`` a shared buffer, ``send`` it back). Timers, signals and everything else stay in
the loop, and the same code runs on uvloop and on the stdlib loop.

Per connection the rules are the Protocol path's: bytes go back as they arrive; while an echo
cannot be sent in full the rest is held and reading from that peer stops (level-triggered
EPOLLOUT until it drains, so a connection holds at most one read of ``--max-buffer`` bytes);
EOF closes once everything was sent; the table's sweep closes idle and stalled ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import struct

from socket_echo.accept import ACCEPT_BATCH, RESOURCE_ERRORS, RETRY_DELAY
from socket_echo.limits import ConnectionTable
from socket_echo.logs import RateLimitedLog, log_event
from socket_echo.protocols.tcp import format_peer

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
READ_CHUNK = 64 * 1024  # measured: 256 KiB reads end in partial sends and stream slower
LINGER_ABORT = struct.pack("ii", 1, 0)  # close() sends RST at once


class Connection:
    __slots__ = (
        "active_since",
        "bytes_in",
        "close_reason",
        "closing",
        "conn_id",
        "drains",
        "engine",
        "fd",
        "listener",
        "opened_at",
        "peer",
        "pending",
        "seen_activity",
        "sock",
    )

    def __init__(
        self, engine: EpollEngine, sock: socket.socket, peer: object, listener: str, now: float
    ) -> None:
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.listener = listener
        self.opened_at = now
        self.conn_id = 0
        self.bytes_in = 0
        self.drains = 0
        self.seen_activity = 0
        self.active_since = now
        self.pending: memoryview | None = None  # echo bytes the kernel would not take yet
        self.closing = False  # shutting down: read nothing more, flush, then FIN
        self.close_reason = ""

    # called by the table's sweep
    def activity(self) -> int:
        return self.bytes_in + self.drains

    def idle_expired(self) -> None:
        if self.pending is not None or self.closing:
            self.engine.abort(self, "write stalled")  # the peer stopped reading
        else:
            self.engine.close(self, "idle timeout")


class EpollEngine:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        table: ConnectionTable,
        max_buffer: int,
        access_log: bool,
        exhausted: RateLimitedLog,
    ) -> None:
        self.loop = loop
        self.table = table
        self.access_log = access_log
        self.exhausted = exhausted
        self.epoll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.listeners: dict[int, tuple[socket.socket, str]] = {}
        self.accepting = True
        self._accept_retry: asyncio.TimerHandle | None = None
        self._buf = bytearray(max(1, min(READ_CHUNK, max_buffer)))
        self._view = memoryview(self._buf)
        loop.add_reader(self.epoll.fileno(), self._ready)

    # -- listeners ----------------------------------------------------------------------
    def add_listener(self, sock: socket.socket, url: str) -> None:
        self.listeners[sock.fileno()] = (sock, url)
        self.epoll.register(sock.fileno(), EPOLLIN)

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
        self._accept_retry = self.loop.call_later(RETRY_DELAY, self._resume_accepting)
        self.exhausted.note()

    def _resume_accepting(self) -> None:
        if self._accept_retry is not None and self.accepting:
            self._accept_retry.cancel()
            self._accept_retry = None
            for fd in self.listeners:
                self.epoll.modify(fd, EPOLLIN)

    def _accept(self, lsock: socket.socket, url: str) -> None:
        table = self.table
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in RESOURCE_ERRORS:
                    self._pause_accepting()
                    return
                raise
            sock.setblocking(False)
            conn = Connection(self, sock, peer, url, self.loop.time())
            if not table.admit(conn, conn.opened_at, url):
                sock.close()
                continue
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.conn_id = table.opened
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, EPOLLIN)
            if self.access_log:
                log_event(
                    logging.INFO,
                    "connection_open",
                    f"connection #{conn.conn_id} from {format_peer(peer)}",
                    conn=conn.conn_id,
                    listener=url,
                    peer=format_peer(peer),
                )

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
                self._finish(conn, "peer closed")
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

    def _flush(self, conn: Connection) -> None:
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
    def _half_close(self, conn: Connection) -> None:
        """Everything echoed: send FIN, then wait for the peer's close (reads are dropped)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            self.epoll.modify(conn.fd, EPOLLIN)
        except OSError as exc:
            self._lost(conn, exc)

    def close(self, conn: Connection, reason: str) -> None:
        """Stop echoing, deliver what is already owed, then close (used by idle and drain)."""
        if conn.closing:
            return
        conn.close_reason = reason
        conn.closing = True
        if conn.pending is None:
            self._half_close(conn)

    def abort(self, conn: Connection, reason: str) -> None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
        self._finish(conn, reason)

    def _lost(self, conn: Connection, exc: OSError) -> None:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            self._finish(conn, "reset by peer")
        else:
            self._finish(conn, f"error: {exc.strerror or exc}")

    def _finish(self, conn: Connection, reason: str) -> None:
        self.conns.pop(conn.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(conn.fd)
        conn.sock.close()
        reason = conn.close_reason or reason
        unsent = len(conn.pending) if conn.pending is not None else 0
        bytes_out = conn.bytes_in - unsent
        duration = self.loop.time() - conn.opened_at
        self.table.release(
            conn, reason.split(":")[0], conn.bytes_in, bytes_out, conn.listener, duration
        )
        if self._accept_retry is not None:
            self._resume_accepting()  # a descriptor just came free
        if self.access_log:
            peer = format_peer(conn.peer)
            log_event(
                logging.INFO,
                "connection_close",
                f"connection #{conn.conn_id} from {peer} closed: {reason}; "
                f"in {conn.bytes_in} B, out {bytes_out} B, {duration:.3f} s",
                conn=conn.conn_id,
                listener=conn.listener,
                peer=peer,
                bytes_in=conn.bytes_in,
                bytes_out=bytes_out,
                duration=round(duration, 6),
                reason=reason,
            )

    # -- shutdown -----------------------------------------------------------------------
    def close_all(self, reason: str) -> None:
        for conn in list(self.conns.values()):
            self.close(conn, reason)

    def abort_all(self, reason: str) -> None:
        for conn in list(self.conns.values()):
            self.abort(conn, reason)

    def shutdown(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()
