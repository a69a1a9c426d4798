"""An impaired UDP echo: after the reflection guard has allowed a datagram, it may be dropped
(``drop`` percent), answered twice (``duplicate``), and each answer leaves after ``delay`` +
up to ``jitter`` (so answers may overtake each other, as on a real path). ``seed`` fixes the
dice. Delayed answers wait in one queue per socket, ordered by when each may leave, with one
timer for the head (never one per datagram): past ``MAX_PENDING`` answers or
``MAX_PENDING_BYTES`` of them the newest are dropped and counted (``QUEUE_FULL``), never
queued without bound. So a socket holds at most MAX_PENDING_BYTES of data plus ~300 B per
answer (its tuple, the sender's address, the bytes object's header): about 10 MiB, whatever
the delay, the duplication or the datagrams' size (a duplicate shares its original's bytes
but counts twice). The guard's rules run first, as on every
UDP path: an impaired listener is never a better reflector than a plain one.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import socket

from socket_echo.config import UDP_BATCH
from socket_echo.impair.clock import call_when_due, now
from socket_echo.impair.params import Impairments
from socket_echo.state import UdpStats
from socket_echo.udp.guard import RECEIVE_ERROR, SEND_ERROR, SEND_FULL, UdpGuard
from socket_echo.udp.loop import MAX_DATAGRAM

MAX_PENDING = 4096  # delayed answers waiting at most
MAX_PENDING_BYTES = 8 << 20  # and their bytes at most (4096 x 64 KiB would be 256 MiB)
QUEUE_FULL = "impairment queue full"  # a drop reason of impaired listeners only


class ImpairedUdpEcho:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        guard: UdpGuard,
        stats: UdpStats,
        impair: Impairments,
        listener: str,
        applied: dict[tuple[str, str], int],
    ) -> None:
        self.loop, self.sock, self.guard, self.stats = loop, sock, guard, stats
        self.impair, self.listener, self.applied = impair, listener, applied
        self.rng = random.Random(impair.seed) if impair.seed is not None else random.Random()
        self._buf = bytearray(MAX_DATAGRAM)
        self.queue: list[tuple[float, int, bytes, tuple[str, int]]] = []  # a heap by due time
        self._order = 0  # ties keep arrival order
        self.pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        imp, stats, rng = self.impair, self.stats, self.rng
        t = self.loop.time()  # the guard's buckets: the loop's clock will do
        for _ in range(UDP_BATCH):
            try:
                n, addr = self.sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                stats.dropped[RECEIVE_ERROR] += 1
                continue
            stats.datagrams_in += 1
            stats.bytes_in += n
            reason = self.guard.check(addr[0], addr[1], t)
            if reason is not None:
                stats.dropped[reason] += 1
                continue
            if imp.drop and rng.random() < imp.drop:
                self._count("dropped")
                continue
            copies = 2 if imp.duplicate and rng.random() < imp.duplicate else 1
            if copies == 2:
                self._count("duplicated")
            data = bytes(self._buf[:n])
            for _ in range(copies):
                wait = imp.delay + (rng.random() * imp.jitter if imp.jitter else 0.0)
                if wait <= 0:
                    self._send(data, addr)
                elif len(self.queue) >= MAX_PENDING or self.pending_bytes + n > MAX_PENDING_BYTES:
                    stats.dropped[QUEUE_FULL] += 1
                else:
                    self._count("delayed")
                    self._later(now() + wait, data, addr)

    def _later(self, due: float, data: bytes, addr: tuple[str, int]) -> None:
        self._order += 1
        heapq.heappush(self.queue, (due, self._order, data, addr))
        self.pending_bytes += len(data)
        if self._timer is None or due < self._timer_due:  # jitter: a new head
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = self.queue[0][0]
        self._timer = call_when_due(self.loop, self._timer_due, self._release)

    def _release(self) -> None:
        """What is due leaves; the timer is armed again for the new head (or for what is
        left of this one, when it fired early)."""
        self._timer = None
        t, queue = now(), self.queue
        while queue and queue[0][0] <= t:
            _, _, data, addr = heapq.heappop(queue)
            self.pending_bytes -= len(data)
            self._send(data, addr)
        if queue:
            self._arm()

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.stats.dropped[SEND_FULL] += 1
            return
        except OSError:
            self.stats.dropped[SEND_ERROR] += 1
            return
        self.stats.datagrams_out += 1
        self.stats.bytes_out += len(data)

    def _count(self, kind: str) -> None:
        key = (self.listener, kind)
        self.applied[key] = self.applied.get(key, 0) + 1

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.queue.clear()
        self.pending_bytes = 0
