"""Send and receive on one socket at once, in one thread: for the client and the probe.

Why not a sender thread: an ``ssl.SSLSocket`` must not be read and written from two threads
at once (one OpenSSL connection object); doing so leaks raw TLS records into the data. One
selector loop works for TCP, Unix and TLS alike; for TLS it retries on want-read/want-write
and drains what OpenSSL already decrypted (``pending()``) before waiting again.
"""

from __future__ import annotations

import collections
import os
import selectors
import socket
import ssl
import stat
import time
from collections.abc import Callable

from socket_echo.tools.defaults import ECHO_FLOOR_RATE

CHUNK = 64 * 1024


class DuplexError(Exception):
    """The peer misbehaved or went silent; one line for the user. ``received``: bytes that
    came back before; ``how``: SILENT, CLOSED, RESET or WRONG (what a caller judges by)."""

    def __init__(self, message: str, received: int = 0, how: str = "wrong") -> None:
        super().__init__(message)
        self.received = received
        self.how = how


SILENT, CLOSED, RESET, WRONG = "silent", "closed", "reset", "wrong"


def duplex(
    sock: socket.socket,
    source: bytes | int,
    sink: Callable[[bytes], object],
    timeout: float,
    expect: int | None = None,
    half_close: bool = True,
    verify: bool = False,
    watch: Callable[[socket.socket], object] | None = None,
) -> tuple[int, int]:
    """Send ``source`` (bytes, or a file descriptor read to its end) while passing what comes
    back to ``sink``. Stops once the source is sent and ``expect`` bytes (default: as many as
    were sent) came back, or at EOF. Returns (sent, received).

    ``timeout`` bounds silence, and it sets each byte's deadline: a byte sent must be back
    within ``timeout`` plus the time the bytes still owed ahead of it take at
    ECHO_FLOOR_RATE (a peer trickling 1 B/s is never silent, and held a step for ever). So a
    step of N bytes ends within ``timeout + N / ECHO_FLOOR_RATE``, whatever the peer does.
    ``verify``: what comes back must be what was sent, byte for byte, in order (an echo);
    DuplexError at the first byte that differs. Only the bytes in flight are kept for it.
    ``watch``: called with the socket on every turn of the loop."""
    sock.setblocking(False)
    fd_source = source if isinstance(source, int) else None
    outgoing = memoryview(source if isinstance(source, bytes) else b"")
    source_done = fd_source is None
    sent = received = 0
    unechoed = bytearray()  # sent and not yet back (verify)
    eof = shut = False
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    # A regular file (``client HOST < file``) is always readable and epoll refuses it (EPERM):
    # read it directly whenever there is nothing left to send.
    file_source = fd_source is not None and stat.S_ISREG(os.fstat(fd_source).st_mode)
    if fd_source is not None and not file_source:
        os.set_blocking(fd_source, False)
        sel.register(fd_source, selectors.EVENT_READ)
    last_progress = started = time.monotonic()
    due: collections.deque[tuple[int, float]] = collections.deque()  # (sent up to, due by)
    try:
        while True:
            want = sent if expect is None else expect
            if source_done and not outgoing and received >= want:
                return sent, received
            if eof:
                raise DuplexError(
                    f"server closed after {received} of {want} bytes came back", received, CLOSED
                )
            if source_done and not outgoing and half_close and not shut:
                _half_close(sock)
                shut = True
            if file_source and not outgoing and not source_done:
                assert fd_source is not None
                block = os.read(fd_source, CHUNK)
                source_done = not block
                outgoing = memoryview(block)
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if outgoing else 0)
            sel.modify(sock, events)
            if watch is not None:  # the caller looks at the connection (probe: the window)
                watch(sock)
            ready = sel.select(0 if isinstance(sock, ssl.SSLSocket) and sock.pending() else 0.2)
            progressed = False
            for key, mask in ready:
                if fd_source is not None and key.fd == fd_source:
                    chunk = _read_fd(key.fd)
                    if chunk is None:
                        continue
                    if not chunk:
                        source_done = True
                        sel.unregister(key.fd)
                    else:
                        outgoing = memoryview(chunk)
                        sel.unregister(key.fd)
                    progressed = True
                    continue
                if mask & selectors.EVENT_WRITE and outgoing:
                    n = _send(sock, outgoing)
                    if n:
                        owed = sent + n - received
                        due.append((sent + n, time.monotonic() + timeout + owed / ECHO_FLOOR_RATE))
                        if verify:
                            unechoed += outgoing[:n]
                        outgoing = outgoing[n:]
                        sent += n
                        progressed = True
                        if (
                            not outgoing
                            and fd_source is not None
                            and not source_done
                            and not file_source
                        ):
                            sel.register(fd_source, selectors.EVENT_READ)
            if isinstance(sock, ssl.SSLSocket) or any(m & selectors.EVENT_READ for _, m in ready):
                while True:
                    data = _recv(sock)
                    if data is None:
                        break
                    if data == b"":
                        eof = True
                        break
                    if verify:
                        _check_echo(unechoed, data, received)
                    received += len(data)
                    sink(data)
                    progressed = True
                    if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                        break
            now = time.monotonic()
            owed = bool(outgoing) or received < (sent if expect is None else expect)
            if progressed or not owed:  # waiting for our own input is not the peer's silence
                last_progress = now
            elif now - last_progress > timeout:
                total = len(source) if isinstance(source, bytes) else sent
                raise DuplexError(
                    f"no answer in time: sent {sent:,} of {total:,} B, {received:,} came back "
                    f"within {timeout:g} s",
                    received,
                    SILENT,
                )
            while due and due[0][0] <= received:
                due.popleft()
            if due and now > due[0][1]:  # answering, but too slowly
                took = now - started
                raise DuplexError(
                    f"the echo is too slow: {received} of {sent} bytes back after {took:.1f} s "
                    f"({received / took:,.0f} B/s); a byte is due within the timeout "
                    f"({timeout:g} s) plus {ECHO_FLOOR_RATE >> 10} KiB/s for those ahead of it",
                    received,
                    SILENT,
                )
    finally:
        sel.close()
        if fd_source is not None and not file_source:
            os.set_blocking(fd_source, True)


def _check_echo(unechoed: bytearray, data: bytes, offset: int) -> None:
    """``data`` came back at ``offset``: it must be the next bytes that were sent."""
    if len(data) > len(unechoed):
        raise DuplexError(
            f"the server sent more than it was sent (byte {offset + len(unechoed)} on)"
        )
    if unechoed[: len(data)] != data:
        at = next(i for i, (a, b) in enumerate(zip(unechoed, data, strict=False)) if a != b)
        raise DuplexError(f"the echo differs from what was sent at byte {offset + at}")
    del unechoed[: len(data)]


def _half_close(sock: socket.socket) -> None:
    """Stop sending, keep receiving (plain sockets only).

    Python's ssl cannot half-close a TLS stream and keep reading: ``SSLSocket.shutdown()``
    drops the TLS session first (``_sslobj = None``), after which ``recv()`` returns the raw,
    still encrypted records; ``unwrap()`` sends close_notify but then lets OpenSSL's
    SSL_shutdown discard the application data still arriving. Over TLS we therefore do not
    half-close: the caller stops once every byte came back."""
    if not isinstance(sock, ssl.SSLSocket):
        sock.shutdown(socket.SHUT_WR)


def _read_fd(fd: int) -> bytes | None:
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None


def _send(sock: socket.socket, data: memoryview) -> int:
    try:
        return sock.send(data[:CHUNK])
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return 0
    except (ConnectionError, ssl.SSLError) as exc:
        raise DuplexError(f"sending failed: {exc}") from None


def _recv(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(CHUNK)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    except ssl.SSLEOFError:
        return b""
    except (ConnectionError, ssl.SSLError) as exc:
        raise DuplexError(f"connection lost: {exc}", how=RESET) from None
