"""UDP echo on Linux with recvmmsg(2)/sendmmsg(2): up to ``SLOTS`` datagrams per system call.

Why by hand, through ctypes: Python's socket module has no recvmmsg/sendmmsg and no
well-kept package offers them. Per datagram, a ``recvfrom_into``/``sendto`` loop pays two
system calls plus a tuple, an address string and an exception at the end of each batch; on
this project's 2-core VM that loop, with no guard at all, reaches only ~0.67x the datagrams
per CPU-second of a C recvfrom/sendto echo. Here one ``recvmmsg`` fills up to ``SLOTS``
slots; per datagram the Python work is a few integer reads from flat memoryviews, the guard's
check on the raw source address bytes (a known source never becomes text) and two writes
into the send vector; one ``sendmmsg`` answers them all. See benchmarks/ for figures.

Memory: ``SLOTS`` slots of 64 KiB in one anonymous mapping; the kernel backs only the pages
a datagram touches, so small datagrams keep the resident size small.

The layout below is the x86-64/aarch64 Linux ABI; ``available()`` checks it and the portable
loop (udp/loop.py) serves everywhere else.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import socket
import sys

from socket_echo.config import UDP_BATCH
from socket_echo.state import UdpStats
from socket_echo.udp.guard import RECEIVE_ERROR, SEND_ERROR, SEND_FULL, UdpGuard
from socket_echo.udp.loop import MAX_DATAGRAM

SLOTS = UDP_BATCH  # datagrams per recvmmsg call
SLOT_SIZE = MAX_DATAGRAM  # no UDP payload is larger: nothing is ever truncated
NAME_SIZE = 28  # sizeof(struct sockaddr_in6), which also holds a sockaddr_in
MMSG_SIZE = 64  # sizeof(struct mmsghdr) on 64-bit Linux
MSG_DONTWAIT = 0x40


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or ctypes.sizeof(_Mmsghdr) != MMSG_SIZE:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.recvmmsg.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


LIBC = _libc()


def available() -> bool:
    return LIBC is not None


class MmsgUdpEcho:
    """Serves one UDP socket (AF_INET, or AF_INET6 with IPv4-mapped clients) on the loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, guard: UdpGuard, stats: UdpStats
    ) -> None:
        assert LIBC is not None
        self.loop, self.sock, self.guard, self.stats = loop, sock, guard, stats
        self.family = sock.family
        # Where the address bytes sit in the sockaddr: sin_addr or sin6_addr.
        self._addr_at = (4, 8) if sock.family == socket.AF_INET else (8, 24)
        self._data = mmap.mmap(-1, SLOTS * SLOT_SIZE)
        data_at = ctypes.addressof(ctypes.c_char.from_buffer(self._data))
        self._names = bytearray(SLOTS * NAME_SIZE)
        names_at = ctypes.addressof(ctypes.c_char.from_buffer(self._names))
        self._recv_iov = (_Iovec * SLOTS)()
        self._send_iov = (_Iovec * SLOTS)()
        self._recv = (_Mmsghdr * SLOTS)()
        self._send = (_Mmsghdr * SLOTS)()
        for i in range(SLOTS):
            self._recv_iov[i].base = data_at + i * SLOT_SIZE
            self._recv_iov[i].len = SLOT_SIZE
            hdr = self._recv[i].hdr
            hdr.name, hdr.namelen = names_at + i * NAME_SIZE, NAME_SIZE
            hdr.iov, hdr.iovlen = ctypes.addressof(self._recv_iov[i]), 1
            self._send[i].hdr.iov = ctypes.addressof(self._send_iov[i])
            self._send[i].hdr.iovlen = 1
        self._data_at = data_at
        # Flat views for the hot path: 64-bit words of the headers, 32-bit for msg_len.
        self._recv_q = memoryview(self._recv).cast("B").cast("Q")
        self._recv_i = memoryview(self._recv).cast("B").cast("I")
        self._send_q = memoryview(self._send).cast("B").cast("Q")
        self._send_iov_q = memoryview(self._send_iov).cast("B").cast("Q")
        self._recv_at = ctypes.addressof(self._recv)
        self._send_at = ctypes.addressof(self._send)
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        """One recvmmsg, the guard over the batch, one sendmmsg (level-triggered: if more is
        waiting the loop calls again, after other work had its turn)."""
        assert LIBC is not None
        fd = self.sock.fileno()
        got = LIBC.recvmmsg(fd, self._recv_at, SLOTS, MSG_DONTWAIT, None)
        stats, dropped = self.stats, self.stats.dropped
        if got < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EINTR):
                dropped[RECEIVE_ERROR] += 1  # e.g. an ICMP error reported on the socket
            return
        check, now, family = self.guard.check, self.loop.time(), self.family
        names, recv_q, recv_i = self._names, self._recv_q, self._recv_i
        send_q, send_iov_q, data_at = self._send_q, self._send_iov_q, self._data_at
        lo, hi = self._addr_at
        answer = b_in = b_out = 0
        for i in range(got):
            size = recv_i[i * 16 + 14]  # mmsghdr.msg_len
            b_in += size
            at = i * NAME_SIZE
            port = names[at + 2] << 8 | names[at + 3]
            reason = check(bytes(names[at + lo : at + hi]), port, now, family)
            if reason is not None:
                dropped[reason] += 1
                continue
            # The answer: the sender's sockaddr (pointer and length words) and the bytes.
            send_q[answer * 8] = recv_q[i * 8]
            send_q[answer * 8 + 1] = recv_q[i * 8 + 1]
            send_iov_q[answer * 2] = data_at + i * SLOT_SIZE
            send_iov_q[answer * 2 + 1] = size
            b_out += size
            answer += 1
        for i in range(got):
            recv_q[i * 8 + 1] = NAME_SIZE  # msg_namelen back to the buffer's size
        stats.datagrams_in += got
        stats.bytes_in += b_in
        if answer:
            self._send_all(fd, answer, b_out)

    def _send_all(self, fd: int, count: int, size: int) -> None:
        """sendmmsg until all ``count`` answers are out; a full buffer drops the rest."""
        assert LIBC is not None
        dropped, lengths = self.stats.dropped, self._send_iov_q
        sent = failed = 0
        while sent < count:
            n = LIBC.sendmmsg(fd, self._send_at + sent * MMSG_SIZE, count - sent, MSG_DONTWAIT)
            if n > 0:
                sent += n
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.ENOBUFS):  # kernel buffer full: drop, never queue
                dropped[SEND_FULL] += count - sent
                failed += count - sent
                size -= sum(lengths[i * 2 + 1] for i in range(sent, count))
                break
            dropped[SEND_ERROR] += 1  # this datagram failed; go on with the next one
            failed += 1
            size -= lengths[sent * 2 + 1]
            sent += 1
        self.stats.datagrams_out += count - failed
        self.stats.bytes_out += size

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
