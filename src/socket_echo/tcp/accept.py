"""Accepting connections, safe under descriptor exhaustion: one batch loop for every path.

Why not ``loop.create_server`` on the stdlib loop: in CPython's selector loop,
``_accept_connection`` on EMFILE schedules a retry timer and then goes on looping (no
``return``), so each readiness event schedules up to ``backlog`` timers, each of which does the
same again; measured here the server stops answering even its open connections and never
recovers (README, "Reliability"). uvloop (libuv) handles EMFILE itself, so plain listeners use
its native server there. TLS listeners use this reader on both loops: they need the raw socket
first (tls+proxy reads the PROXY header before the handshake; a handshake's failure must reach
us to be named).

Here: accept in a bounded batch per readiness event (:func:`accept_batch`, also used by the
epoll path); on EMFILE/ENFILE/ENOBUFS/ENOMEM stop watching the listener, log (rate-limited),
and start again when a connection closes or after ``ACCEPT_RETRY_DELAY``, whichever comes
first. Waiting clients stay in the kernel's backlog meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

from socket_echo.config import ACCEPT_BATCH, ACCEPT_RETRY_DELAY
from socket_echo.logs import RateLimitedLog

RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def accept_batch(lsock: socket.socket, take: Callable[[socket.socket, Any], None]) -> bool:
    """Accept up to ``ACCEPT_BATCH`` connections, each made non-blocking and handed to
    ``take(sock, peer)``. False when the process is out of descriptors or memory: the caller
    pauses accepting. Other errors propagate."""
    for _ in range(ACCEPT_BATCH):
        try:
            sock, peer = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except ConnectionAbortedError:
            continue  # the client gave up while it waited in the backlog
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                return False
            raise
        sock.setblocking(False)
        take(sock, peer)
    return True


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

    @property
    def paused(self) -> bool:
        return self._retry is not None

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
        if accept_batch(self.sock, self._take):
            return
        self.loop.remove_reader(self.sock.fileno())
        self.watching = False
        self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self.start)
        self.exhausted.note()

    def _take(self, sock: socket.socket, peer: Any) -> None:
        self.on_accept(sock)

    def _to_transport(self, conn: socket.socket) -> None:
        self.loop.create_task(adopt(self.loop, self.protocol_factory, conn))


async def adopt(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol] | None,
    sock: socket.socket,
) -> None:
    """An accepted socket into a transport driving ``factory()``'s protocol."""
    try:
        assert factory is not None
        await loop.connect_accepted_socket(factory, sock)
    except OSError:
        sock.close()
