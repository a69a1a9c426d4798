"""bench ``--mode pingpong`` over TCP and Unix sockets, closed and open loop. It runs in C where
the extension is built (bench/_native.c: :class:`NativePingPong` opens the connections and
replaces those that fail; C keeps the schedule, sends, reads, compares and times every
message); :class:`PingPong` is its twin in Python, held to the same rules by the same tests:

- Closed loop (no ``--rate``): one message in flight per connection, the next sent when the
  echo is back; latency counts from the send.
- Open loop (``--rate``): each request has an intended send time on a schedule (``uniform``
  gaps, or ``poisson`` arrivals), its latency counts from then (corrected, as wrk2 does) and
  from when it actually left (uncorrected). Up to ``in_flight`` requests per connection are
  in flight; echoes are matched to requests by position (a stream keeps order) and verified
  byte for byte. A send more than LATE_SEND_US after its slot is counted: ``held`` when the
  window was full (the server's doing), ``late`` otherwise (this process fell behind).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import math
import select
import socket
import time
from typing import Any

from socket_echo import extensions
from socket_echo.kinds import kind
from socket_echo.tools.bench import errors
from socket_echo.tools.bench.loop import WOULD_BLOCK, Loop
from socket_echo.tools.bench.model import BenchConfig
from socket_echo.tools.connect.patterns import pingpong_seed
from socket_echo.tools.connect.target import TlsOptions, Unreachable, connect
from socket_echo.tools.defaults import CHECK_EVERY, LATE_SEND_US, SPIN_US

_native: Any
try:  # the ping-pong in C (bench/_native.c); PingPong below is its twin
    from socket_echo.tools.bench import _native  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:
    _native = None

SPIN = SPIN_US * 1e-6  # the pure loop polls (does not sleep) this close to a slot
POLL_CEILING = 0.001  # epoll.poll() rounds its timeout up to whole milliseconds


def native_pingpong(cfg: BenchConfig) -> bool:
    """Whether the C loop runs this ping-pong: plain TCP or a Unix socket, and TLS where it was
    built with OpenSSL, where the extension is built and SOCKET_ECHO_NO_EXTENSIONS is not set."""
    if _native is None or extensions.disabled():
        return False
    served = kind(cfg.target.scheme)
    return served.engine or (served.tls and bool(_native.TLS))


def pingpong_loop(cfg: BenchConfig) -> type[Loop]:
    return NativePingPong if native_pingpong(cfg) else PingPong


class _Request:
    """One ping-pong request in flight: when it was meant to leave, when it left, its bytes."""

    __slots__ = ("intended", "message", "sent")

    def __init__(self, intended: float, sent: float, message: bytes) -> None:
        self.intended, self.sent, self.message = intended, sent, message


class _Peer:
    """A ping-pong connection: the requests in flight, in the order they were sent."""

    __slots__ = (
        "got", "held", "in_heap", "index", "inflight", "next_slot", "out", "received", "sent",
        "seq", "sock", "unsent", "writing",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.index = index  # in PingPong.peers: the slot heap's key
        self.seq = 0
        self.inflight: collections.deque[_Request] = collections.deque()  # in the order sent
        self.unsent = 0  # of inflight, the last ones not wholly sent yet
        self.out: memoryview | None = None  # the rest of the message being sent
        self.got = 0  # bytes of inflight[0]'s echo received
        self.sent = self.received = 0  # bytes, since the connection opened
        self.next_slot = 0.0
        self.held = False
        self.in_heap = False
        self.writing = False


class NativePingPong(Loop):
    """The ping-pong in C (bench/_native.c); PingPong is its twin. Over tls:// Python opens
    plain TCP connections and C makes each one's handshake (OpenSSL), then runs the loop."""

    def connect(self) -> socket.socket | None:
        if not kind(self.cfg.target.scheme).tls:
            return super().connect()
        tcp = dataclasses.replace(self.cfg.target, scheme="tcp")  # TLS is C's
        try:
            sock = connect(tcp, self.cfg.timeout)
        except Unreachable as exc:
            self.result.errors[errors.because(errors.CONNECT, exc)] += 1
            return None
        sock.setblocking(False)
        return sock

    def tls(self) -> tuple[str | None, bool, str, str | None, str | None] | None:
        """What the C loop's TLS context is made of (TlsOptions.context's twin)."""
        if not kind(self.cfg.target.scheme).tls:
            return None
        opts = self.cfg.tls or TlsOptions()
        name = opts.server_name or self.cfg.target.host
        return (opts.ca_file, opts.insecure, name, opts.cert_file, opts.key_file)

    def serve(self) -> None:
        """The same loop in C: Python opens the connections, replaces those that fail and
        shows progress; C keeps the schedule, sends, reads, compares and times every
        message."""
        cfg, res = self.cfg, self.result
        for _ in range(self.n):
            if (sock := self.connect()) is not None:
                self.socks[sock.fileno()] = sock

        def replace(fd: int, reason: str | None) -> int:
            old = self.socks.pop(fd, None)
            if old is None:
                return -1
            old.close()
            if reason:
                res.errors[reason] += 1
                self.pause()
            new = self.connect()
            if new is None:
                return -1
            res.replacements += 1
            self.socks[new.fileno()] = new
            return new.fileno()

        def tick(requests: int) -> None:
            self.progress.value = requests

        start = self.start()
        out = _native.pingpong(
            list(self.socks),
            cfg.size,
            cfg.duration,
            cfg.timeout,
            self.index,
            self.patterns.base,
            replace,
            tick,
            rate=self.rate,
            poisson=cfg.arrival == "poisson",
            seed=self.index,
            warmup=cfg.warmup,
            start=start,
            depth=cfg.in_flight,
            tls=self.tls(),
        )
        res.begin(out["measured_from"])
        res.requests += out["requests"]
        res.per_second = [collections.Counter(second) for second in out["per_second"]]
        res.uncorrected_us.update(out["uncorrected"] or {})
        res.lateness_us.update(out["lateness"] or {})
        res.mismatches += out["mismatches"]
        res.spun_seconds = out["spun"]
        res.answers, res.first_answer = list(out["answers"]), list(out["first"])
        res.sends, res.late_sends, res.held_sends = (
            out["sends"], out["late_sends"], out["held_sends"]
        )  # fmt: skip
        if out["late"]:
            res.errors[errors.NO_ANSWER] += out["late"]
        res.bytes = res.requests * cfg.size * 2


class PingPong(Loop):
    """The ping-pong loop in Python: bench/_native.c's twin, rule for rule."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        cfg = self.cfg
        self.size = cfg.size
        self.open_loop = self.rate > 0
        self.depth = cfg.in_flight if self.open_loop else 1
        self.peers: list[_Peer] = []
        self.by_fd: dict[int, _Peer] = {}
        self.heap: list[tuple[float, int]] = []  # (next slot, peer index)
        self.interval = 0.0
        self.mstart = 0.0
        self.late = LATE_SEND_US * 1e-6

    def gap(self) -> float:
        if self.cfg.arrival == "poisson":
            return -math.log(1.0 - self.rng.random()) * self.interval
        return self.interval

    def serve(self) -> None:
        cfg, res = self.cfg, self.result
        for _ in range(self.n):
            sock = self.connect()
            if sock is not None:
                peer = _Peer(sock, len(self.peers))
                self.peers.append(peer)
                self.by_fd[sock.fileno()] = peer
                self.epoll.register(sock.fileno(), select.EPOLLIN)
        res.slots(len(self.peers))
        start = self.start()
        self.mstart = res.mono_start
        deadline = self.mstart + cfg.duration
        n = len(self.peers)
        self.interval = n / self.rate if self.open_loop and n else 0.0
        for i, peer in enumerate(self.peers):
            poisson = cfg.arrival == "poisson"
            peer.next_slot = start + (self.gap() if poisson else self.interval * i / n)
            self.fill(i, start)
        next_check = start + CHECK_EVERY
        poll, by_fd, heap = self.epoll.poll, self.by_fd, self.heap
        while True:
            t = time.monotonic()
            if t >= deadline:
                break
            while heap and heap[0][0] <= t:  # slots that have come
                _, i = heapq.heappop(heap)
                self.peers[i].in_heap = False
                if self.peers[i].sock.fileno() >= 0:
                    self.fill(i, t)
            if t >= next_check:  # unanswered this long: the server lost bytes
                next_check = t + CHECK_EVERY
                for i, peer in enumerate(self.peers):
                    if peer.inflight and peer.inflight[0].sent < t - cfg.timeout:
                        self.replace(i, errors.NO_COMPLETE_ANSWER)
                self.progress.value = res.requests
            wake = min(next_check, deadline)
            if heap:
                wake = min(wake, heap[0][0] - SPIN)
            for fd, events in poll(max(0.0, wake - t - POLL_CEILING)):
                ready = by_fd.get(fd)
                if ready is None:
                    continue
                i = ready.index
                if ready.writing and events & select.EPOLLOUT:
                    self.push(i)
                if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self.readable(i)
        end = time.monotonic()
        for peer in self.peers:  # still waiting, longer than the timeout: an answer lost
            if peer.inflight and end - peer.inflight[0].sent > cfg.timeout:
                res.errors[errors.NO_ANSWER] += 1
        for peer in self.peers:
            self.socks[peer.sock.fileno()] = peer.sock
        res.bytes = res.requests * self.size * 2

    def fill(self, i: int, t: float) -> None:
        """Send every request whose slot has come and for which there is room."""
        peer = self.peers[i]
        if not self.open_loop:
            if not peer.inflight:
                self.issue(i, t, t, False)
            return
        held = peer.held
        while peer.next_slot <= t:
            if len(peer.inflight) >= self.depth:
                peer.held = True  # the server has not answered enough: wait for an echo
                return
            slot = peer.next_slot
            peer.next_slot += self.gap()
            if not self.issue(i, slot, t, held):
                return
        peer.held = False
        if len(peer.inflight) < self.depth and not peer.in_heap:
            peer.in_heap = True
            heapq.heappush(self.heap, (peer.next_slot, i))

    def issue(self, i: int, intended: float, t: float, held: bool) -> bool:
        peer = self.peers[i]
        peer.seq += 1
        message = self.message(peer.seq)
        peer.inflight.append(_Request(intended, t, message))
        peer.unsent += 1
        if self.open_loop and intended >= self.mstart:
            self.result.sends += 1
            self.result.lateness_us[int((t - intended) * 1e6)] += 1
            if t - intended > self.late:
                if held:
                    self.result.held_sends += 1
                else:
                    self.result.late_sends += 1
        if peer.unsent > 1:
            return True  # it goes once those before it are out
        try:  # nothing waits before it: straight to the kernel (the usual case)
            n = peer.sock.send(message)
        except WOULD_BLOCK:
            n = 0
        except OSError as exc:
            self.replace(i, errors.because(errors.SEND, exc.strerror or exc))
            return False
        peer.sent += n
        if n == len(message):
            peer.unsent = 0
        else:
            peer.out = memoryview(message)[n:]
            self.want_out(peer, True)
        return True

    def push(self, i: int) -> bool:
        """Send what is queued (the socket is writable again); False when the connection
        failed (and was replaced)."""
        peer = self.peers[i]
        while peer.unsent:
            if peer.out is None:
                entry = peer.inflight[-peer.unsent]
                entry.sent = time.monotonic()
                peer.out = memoryview(entry.message)
            try:
                n = peer.sock.send(peer.out)
            except WOULD_BLOCK:
                n = 0
            except OSError as exc:
                self.replace(i, errors.because(errors.SEND, exc.strerror or exc))
                return False
            peer.sent += n
            if n < len(peer.out):
                peer.out = peer.out[n:]
                self.want_out(peer, True)
                return True
            peer.out = None
            peer.unsent -= 1
        self.want_out(peer, False)
        return True

    def want_out(self, peer: _Peer, on: bool) -> None:
        if peer.writing != on:
            peer.writing = on
            flags = select.EPOLLIN | (select.EPOLLOUT if on else 0)
            self.epoll.modify(peer.sock.fileno(), flags)

    def message(self, seq: int) -> bytes:
        return self.patterns.message(pingpong_seed(seq, self.index))

    def readable(self, i: int) -> None:
        """Match what came back to the requests in flight by position, and verify it."""
        peer = self.peers[i]
        try:
            data = peer.sock.recv(65536)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self.replace(i, errors.because(errors.RECV, exc.strerror or exc))
            return
        if not data:
            self.replace(i, errors.CLOSED_BY_SERVER)
            return
        if peer.received + len(data) > peer.sent:
            self.result.mismatches += 1  # more bytes back than were sent
            self.replace(i, None)
            return
        peer.received += len(data)
        t = time.monotonic()
        size, off = self.size, 0
        if not peer.got and len(data) == size and len(peer.inflight) == 1:  # one whole echo
            entry = peer.inflight[0]
            if data != entry.message:
                self.result.mismatches += 1
                self.replace(i, None)
                return
            peer.inflight.popleft()
            self.answered(entry, t, i)
            self.fill(i, t)
            return
        while off < len(data):
            entry = peer.inflight[0]
            take = min(size - peer.got, len(data) - off)
            expected = entry.message
            if data[off : off + take] != expected[peer.got : peer.got + take]:
                self.result.mismatches += 1
                self.replace(i, None)  # out of step: a new connection
                return
            peer.got += take
            off += take
            if peer.got == size:
                peer.inflight.popleft()
                peer.got = 0
                self.answered(entry, t, i)
        self.fill(i, t)

    def answered(self, entry: _Request, t: float, i: int) -> None:
        if entry.intended >= self.mstart:  # not the warm-up
            self.result.record(int((t - entry.intended) * 1e6), t, i)
            if self.open_loop:
                self.result.uncorrected_us[int((t - entry.sent) * 1e6)] += 1

    def replace(self, i: int, reason: str | None) -> None:
        """A new connection in place of this one (reason None: already counted); the
        requests in flight are gone with it, the schedule goes on."""
        peer = self.peers[i]
        fd = peer.sock.fileno()
        self.by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)
        peer.sock.close()
        if reason:
            self.result.errors[reason] += 1
            self.pause()
        peer.inflight.clear()
        peer.unsent = peer.got = peer.sent = peer.received = 0
        peer.out = None
        peer.writing = False
        sock = self.connect()
        if sock is None:
            return  # none to be had: this slot rests (its socket is closed: fileno -1)
        self.result.replacements += 1
        peer.sock = sock
        self.by_fd[sock.fileno()] = peer
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.fill(i, time.monotonic())
