"""Accepting connections on the stdlib asyncio loop, safe under descriptor exhaustion.

Why not ``loop.create_server`` there: in CPython's selector loop, ``_accept_connection`` on
EMFILE schedules a retry timer and then goes on looping (no ``return``), so each readiness
event schedules up to ``backlog`` timers, each of which does the same again; measured here the
server stops answering even its open connections and never recovers (DESIGN.md section 6).
uvloop (libuv) handles EMFILE itself, so plain listeners use its native server there.
TLS listeners use this reader on both loops: they need the raw socket first (tls+proxy reads
the PROXY header before the handshake; a handshake's failure must reach us to be named).

Here: accept in a bounded batch per readiness event; on EMFILE/ENFILE/ENOBUFS/ENOMEM stop
watching the listener, log (rate-limited), and start again when a connection closes or after
a short delay, whichever comes first. Waiting clients stay in the kernel's backlog meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

from socket_echo.logs import RateLimitedLog

RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BATCH = 128
RETRY_DELAY = 0.25


def descriptor_log() -> RateLimitedLog:
    return RateLimitedLog(
        "accept_paused",
        "out of file descriptors (or memory): accept paused {count} time(s); "
        "open connections go on, new ones wait in the backlog",
    )


class AcceptReader:
    """Accepts from one listening socket and hands each new socket to ``on_accept`` (by
    default: into ``protocol_factory`` through the loop's transports)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol] | None,
        exhausted: RateLimitedLog,
        on_accept: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.on_accept = on_accept or self._to_transport
        self.exhausted = exhausted
        self.watching = False
        self.closed = False
        self._retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self.watching and not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept_ready)
            self.watching = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def resume_if_paused(self) -> None:
        if self._retry is not None:
            self.start()

    def close(self) -> None:
        self.closed = True
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRORS:
                    raise
                self.loop.remove_reader(self.sock.fileno())
                self.watching = False
                self._retry = self.loop.call_later(RETRY_DELAY, self.start)
                self.exhausted.note()
                return
            conn.setblocking(False)
            self.on_accept(conn)

    def _to_transport(self, conn: socket.socket) -> None:
        self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            assert self.protocol_factory is not None
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except OSError:
            conn.close()
