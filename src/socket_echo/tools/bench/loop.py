"""A load worker of ``socket-echo bench`` over TCP, Unix sockets and UDP: one per process, a
plain epoll loop (no asyncio: the load generator must cost less than the server it measures).
:class:`Loop` holds what every mode shares (the connections, the start together, the pause
after an error, the window); each mode is a subclass in a module of its own (pingpong.py,
stream.py, churn.py, datagrams.py), chosen by workers.worker_main, which also runs the QUIC
and DTLS workers (secure.py). Every byte that comes back is compared with what was sent.

Requests of the warm-up are run and left out of every figure.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import time
from typing import Any

from socket_echo.tools.bench import errors
from socket_echo.tools.bench.model import BenchConfig, WorkerResult, cpu_seconds
from socket_echo.tools.connect import tcp_info
from socket_echo.tools.connect.ending import end_gracefully
from socket_echo.tools.connect.patterns import Patterns
from socket_echo.tools.connect.target import Unreachable, connect

# "Not now" from a non-blocking socket, plain or TLS: a TLS socket says it with its own errors
# (a record not complete yet, or a write to be retried with the same bytes). A TLS record is at
# most 16 KiB and every read here asks for more, so no plaintext waits inside OpenSSL unseen by
# epoll (no read-ahead): level-triggered readiness is enough.
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Conn:
    """A stream, churn or UDP connection."""

    __slots__ = ("connected", "expected", "got", "lost", "seq", "slot", "sock", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.expected = b""
        self.got = b""
        self.t0 = 0.0
        self.seq = 0
        self.connected = False  # churn: the non-blocking connect finished
        self.lost: set[int] = set()  # UDP: sequence numbers counted lost, for late answers
        self.slot = -1  # which of the worker's connections it is (churn: each in turn)


class Loop:
    """One worker process's share of the run: ``connections`` connections at ``rate``
    requests/s (0: closed loop); :meth:`serve` is the mode's."""

    def __init__(
        self, cfg: BenchConfig, connections: int, rate: float, index: int, progress: Any
    ) -> None:
        self.cfg = cfg
        self.n = connections
        self.rate = rate  # this worker's share of the requests/s
        self.index = index
        self.progress = progress
        self.result = WorkerResult()
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.socks: dict[int, socket.socket] = {}  # ping-pong's, by descriptor
        self.patterns = Patterns(cfg.size)
        self.rng = random.Random(index)

    def serve(self) -> None:
        raise NotImplementedError

    def run(self) -> WorkerResult:
        cpu0 = cpu_seconds()
        self.serve()
        # the window: from its start to its deadline (or to an early end), not the teardown
        measured = time.monotonic() - self.result.mono_start
        self.result.elapsed = max(1e-9, min(measured, self.cfg.duration))
        self.result.cpu_seconds = cpu_seconds() - cpu0
        self.epoll.close()
        socks = [conn.sock for conn in self.conns.values()] + list(self.socks.values())
        for sock in socks:  # what the kernel saw of the peer, before the end
            info, _ = tcp_info.read(sock) if sock.fileno() >= 0 else ({}, [])
            if info:
                self.result.retransmits += info.get("total_retrans", info["retrans"])
                self.result.kernel_rtt_us.append(info["rtt_us"])
        ending = end_gracefully(socks, self.cfg.drain_timeout)  # never harm the peer
        self.result.ended_gracefully += ending.graceful
        self.result.resets_sent += ending.resets
        self.result.drained_bytes += ending.drained_bytes
        return self.result

    def start(self) -> float:
        """When this worker begins (time.monotonic): at --start-at if given (every process
        and segment together), else now; the measured window begins after the warm-up."""
        start = time.monotonic()
        if self.cfg.start_at is not None:
            start = max(start, start + self.cfg.start_at - time.time())
            while (left := start - time.monotonic()) > 0.002:
                time.sleep(left - 0.002)
        self.result.begin(start + self.cfg.warmup)
        return start

    def connect(self) -> socket.socket | None:
        """A non-blocking connected socket, or None (the failure counted)."""
        try:
            sock = connect(self.cfg.target, self.cfg.timeout, self.cfg.tls)
        except Unreachable as exc:
            self.result.errors[errors.because(errors.CONNECT, exc)] += 1
            return None
        sock.setblocking(False)
        return sock

    def open(self) -> Conn | None:
        sock = self.connect()
        if sock is None:
            return None
        conn = Conn(sock)
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        return conn

    def pause(self) -> None:
        """After an error: no busy loop on a dead server."""
        time.sleep(0.001 * min(self.result.errors.total(), 100))
