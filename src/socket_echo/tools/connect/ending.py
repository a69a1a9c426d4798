"""How the tools end a stream connection without harming the peer: stop sending, half-close
(FIN), read what is still owed until the peer closes too (EOF), then close. A reset only when
the peer has not closed within the drain timeout, and then counted.

Why: a firmware echo loop like the Zephyr sample's (the seed) treats ``recv() == -1`` as data;
after a reset it spins for ever and never accepts again, so a tool that ends with RST (closing
with unread echo, SO_LINGER 0) wedges the board it measures until it is power-cycled. A close
with unread data in the receive queue, or data arriving after the close, makes the kernel send
RST: hence reading to EOF before closing. All connections end at once (one selector), so
thousands end within one drain timeout, not one each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import socket
import struct
import time
from collections.abc import Iterable

LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@dataclasses.dataclass
class Ending:
    """How a set of connections ended."""

    graceful: int = 0  # the peer closed after its echo: FIN both ways
    resets: int = 0  # the peer had not closed within the drain timeout: reset, counted
    drained_bytes: int = 0  # echo that came back after the end (not in any latency figure)


def end_gracefully(socks: Iterable[socket.socket], drain_timeout: float) -> Ending:
    """End every stream socket of ``socks`` as the module says; returns how they ended. A
    socket whose connect is still under way (bench's churn) is let finish it first: a close
    in SYN_SENT answers the peer's SYN-ACK with a reset, and a half-close there is refused."""
    ending = Ending()
    sel = selectors.DefaultSelector()
    try:
        for sock in socks:
            if sock.fileno() < 0:
                continue
            if sock.type != socket.SOCK_STREAM:
                sock.close()
                continue
            sock.setblocking(False)
            try:
                sock.getpeername()
            except OSError:  # not connected yet: wait for the connect to end
                sel.register(sock, selectors.EVENT_WRITE, sock)
                continue
            _half_close(sel, sock)
        deadline = time.monotonic() + drain_timeout
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                sock = key.data
                if key.events == selectors.EVENT_WRITE:  # the connect ended
                    sel.unregister(sock)
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        sock.close()  # it failed: there is no connection to spare
                    else:
                        _half_close(sel, sock)
                    continue
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:  # the peer reset: nothing owed any more
                    data = b""
                ending.drained_bytes += len(data)
                if not data:
                    sel.unregister(sock)
                    sock.close()
                    ending.graceful += 1
        for key in list(sel.get_map().values()):  # silent past the drain timeout
            sock = key.data
            sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.close()
            ending.resets += 1
    finally:
        sel.close()
    return ending


def _half_close(sel: selectors.BaseSelector, sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # already reset or closed by the peer: nothing to spare it
        sock.close()
        return
    sel.register(sock, selectors.EVENT_READ, sock)
