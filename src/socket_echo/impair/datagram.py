"""An impaired UDP echo: after the reflection guard has allowed a datagram, it may be dropped
(``drop`` percent), answered twice (``duplicate``), and each answer leaves after ``delay`` +
up to ``jitter`` (so answers may overtake each other, as on a real path). ``seed`` fixes the
dice. Delayed answers wait in a bounded set of timers: past ``MAX_PENDING`` the newest are
dropped and counted, never queued without bound. The guard's rules run first, as on every
UDP path: an impaired listener is never a better reflector than a plain one.
"""

from __future__ import annotations

import asyncio
import random
import socket

from socket_echo.config import UDP_BATCH
from socket_echo.impair.clock import call_when_due, now
from socket_echo.impair.params import Impairments
from socket_echo.state import UdpStats
from socket_echo.udp.guard import RECEIVE_ERROR, SEND_ERROR, SEND_FULL, UdpGuard
from socket_echo.udp.loop import MAX_DATAGRAM

MAX_PENDING = 4096  # delayed answers waiting at most


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
        self.pending = 0
        self._buf = bytearray(MAX_DATAGRAM)
        self._handles: set[asyncio.TimerHandle] = set()
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
                elif self.pending >= MAX_PENDING:
                    stats.dropped["impairment queue full"] += 1
                else:
                    self.pending += 1
                    self._count("delayed")
                    self._later(now() + wait, data, addr)

    def _later(self, due: float, data: bytes, addr: tuple[str, int]) -> None:
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            nonlocal handle
            if handle is not None:
                self._handles.discard(handle)
            if now() < due:  # early (uvloop): arm again for what is left
                handle = call_when_due(self.loop, due, fire)
                self._handles.add(handle)
                return
            self.pending -= 1
            self._send(data, addr)

        handle = call_when_due(self.loop, due, fire)
        self._handles.add(handle)

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
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
