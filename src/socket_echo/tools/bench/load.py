"""The load workers of ``socket-echo bench`` over TCP, Unix sockets and UDP: one per process,
each a plain epoll loop (no asyncio: the load generator must cost less than the server it
measures). Every byte that comes back is compared with what was sent.

``pingpong`` runs in C where the extension is built (tools/_native.c, closed and open loop);
the loop here is its twin, held to the same rules by the same tests:

- Closed loop (no ``--rate``): one message in flight per connection, the next sent when the
  echo is back; latency counts from the send.
- Open loop (``--rate``): each request has an intended send time on a schedule (``uniform``
  gaps, or ``poisson`` arrivals), its latency counts from then (corrected, as wrk2 does) and
  from when it actually left (uncorrected). Up to ``in_flight`` requests per connection are
  in flight; echoes are matched to requests by position (a stream keeps order) and verified
  byte for byte. A send more than LATE_SEND_US after its slot is counted: ``held`` when the
  window was full (the server's doing), ``late`` otherwise (this process fell behind).

Requests of the warm-up are run and left out of every figure.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import math
import os
import random
import select
import socket
import time
from typing import Any

from socket_echo.kinds import DTLS, QUIC, kind
from socket_echo.tools.bench.model import BenchConfig, WorkerResult, cpu_seconds
from socket_echo.tools.connect.patterns import Patterns
from socket_echo.tools.connect.target import Unreachable, connect
from socket_echo.tools.defaults import LATE_SEND_US, UDP_TIMEOUT

_native: Any
try:  # the ping-pong in C (tools/_native.c); the Python loop below is its twin
    from socket_echo.tools.bench import _native  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:
    _native = None

STREAM_WINDOW = 4 << 20  # bytes in flight per stream connection at most
STREAM_PERIOD = 1 << 20
CHECK_EVERY = 0.1  # timeouts are looked for, and progress shown, this often
SPIN = 0.0002  # the pure loop polls (does not sleep) this close to a slot
POLL_CEILING = 0.001  # epoll.poll() rounds its timeout up to whole milliseconds


def native_pingpong(cfg: BenchConfig) -> bool:
    """Whether the C loop runs this ping-pong: plain TCP or a Unix socket, where the
    extension is built and SOCKET_ECHO_NO_EXTENSIONS is not set."""
    return (
        _native is not None
        and not os.environ.get("SOCKET_ECHO_NO_EXTENSIONS")
        and kind(cfg.target.scheme).engine
    )


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


class _Conn:
    """A stream, churn or UDP connection."""

    __slots__ = ("connected", "expected", "got", "lost", "seq", "sock", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.expected = b""
        self.got = b""
        self.t0 = 0.0
        self.seq = 0
        self.connected = False  # churn: the non-blocking connect finished
        self.lost: set[int] = set()  # UDP: sequence numbers counted lost, for late answers


class Worker:
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
        self.conns: dict[int, _Conn] = {}
        self.socks: dict[int, socket.socket] = {}  # pingpong: by descriptor
        self.patterns = Patterns(cfg.size)
        self.rng = random.Random(index)

    def run(self) -> WorkerResult:
        cpu0 = cpu_seconds()
        getattr(self, f"_run_{self.cfg.mode}")()
        # the window: from its start to its deadline (or to an early end), not the teardown
        measured = time.monotonic() - self.result.mono_start
        self.result.elapsed = max(1e-9, min(measured, self.cfg.duration))
        self.result.cpu_seconds = cpu_seconds() - cpu0
        for conn in self.conns.values():
            conn.sock.close()
        for sock in self.socks.values():
            sock.close()
        self.epoll.close()
        return self.result

    def _start(self) -> float:
        """When this worker begins (time.monotonic): at --start-at if given (every process
        and segment together), else now; the measured window begins after the warm-up."""
        start = time.monotonic()
        if self.cfg.start_at is not None:
            start = max(start, start + self.cfg.start_at - time.time())
            while (left := start - time.monotonic()) > 0.002:
                time.sleep(left - 0.002)
        self.result.begin(start + self.cfg.warmup)
        return start

    # -- connections ------------------------------------------------------------------
    def _connect(self) -> socket.socket | None:
        try:
            sock = connect(self.cfg.target, self.cfg.timeout)
        except Unreachable as exc:
            self.result.errors[f"connect: {exc}"] += 1
            return None
        sock.setblocking(False)
        return sock

    def _open(self) -> _Conn | None:
        sock = self._connect()
        if sock is None:
            return None
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        return conn

    def _pause(self) -> None:
        time.sleep(0.001 * min(self.result.errors.total(), 100))  # no busy loop on a dead server

    # -- pingpong (closed or open loop) -----------------------------------------------
    def _run_pingpong(self) -> None:
        if native_pingpong(self.cfg):
            self._run_pingpong_native()
        else:
            PingPong(self).run()

    def _run_pingpong_native(self) -> None:
        """The same loop in C: Python opens the connections, replaces those that fail and
        shows progress; C keeps the schedule, sends, reads, compares and times every
        message."""
        cfg, res = self.cfg, self.result
        for _ in range(self.n):
            if (sock := self._connect()) is not None:
                self.socks[sock.fileno()] = sock

        def replace(fd: int, reason: str | None) -> int:
            old = self.socks.pop(fd, None)
            if old is None:
                return -1
            old.close()
            if reason:
                res.errors[reason] += 1
                self._pause()
            new = self._connect()
            if new is None:
                return -1
            self.socks[new.fileno()] = new
            return new.fileno()

        def tick(requests: int) -> None:
            self.progress.value = requests

        start = self._start()
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
        )
        res.begin(out["measured_from"])
        res.requests += out["requests"]
        res.per_second = [collections.Counter(second) for second in out["per_second"]]
        res.uncorrected_us.update(out["uncorrected"] or {})
        res.lateness_us.update(out["lateness"] or {})
        res.mismatches += out["mismatches"]
        res.spun_seconds = out["spun"]
        res.sends, res.late_sends, res.held_sends = (
            out["sends"], out["late_sends"], out["held_sends"]
        )  # fmt: skip
        if out["late"]:
            res.errors["no answer within the timeout"] += out["late"]
        res.bytes = res.requests * cfg.size * 2

    # -- stream -----------------------------------------------------------------------
    def _run_stream(self) -> None:
        cfg, res = self.cfg, self.result
        size = cfg.size
        period = max(STREAM_PERIOD, size)
        # Two copies of one period: byte at absolute offset p is always buf[p % period], also
        # for a chunk that starts before a period boundary and ends after it.
        buf = bytes((i * 2654435761 >> 13) & 0xFF for i in range(period)) * 2
        view = memoryview(buf)
        for _ in range(self.n):
            conn = self._open()
            if conn:
                self.epoll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        sent: dict[int, int] = dict.fromkeys(self.conns, 0)
        got: dict[int, int] = dict.fromkeys(self.conns, 0)
        self._start()
        measured_from = res.mono_start
        deadline = measured_from + cfg.duration
        while (now := time.monotonic()) < deadline:
            counting = now >= measured_from
            for fd, events in self.epoll.poll(0.1):
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if events & select.EPOLLOUT:
                    for _ in range(16):
                        if sent[fd] - got[fd] >= STREAM_WINDOW:
                            break
                        off = sent[fd] % period
                        try:
                            n = conn.sock.send(view[off : off + size])
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            res.errors[f"send: {exc.strerror or exc}"] += 1
                            return
                        sent[fd] += n
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    try:
                        data = conn.sock.recv(1 << 18)
                    except BlockingIOError:
                        data = None
                    except OSError as exc:
                        res.errors[f"recv: {exc.strerror or exc}"] += 1
                        return
                    if data == b"":
                        res.errors["closed by server"] += 1
                        return
                    if data:
                        off = got[fd] % period
                        if data != view[off : off + len(data)]:
                            res.mismatches += 1
                            return
                        got[fd] += len(data)
                        if counting:
                            res.bytes += len(data)
                flags = select.EPOLLIN
                if sent[fd] - got[fd] < STREAM_WINDOW:
                    flags |= select.EPOLLOUT
                self.epoll.modify(fd, flags)
            self.progress.value = res.bytes
        res.requests = res.bytes // size

    # -- churn ------------------------------------------------------------------------
    def _run_churn(self) -> None:
        cfg, res = self.cfg, self.result
        self._start()
        deadline = res.mono_start + cfg.duration
        churned = 0
        for _ in range(self.n):
            self._start_churn()
        while time.monotonic() < deadline:
            for fd, _ in self.epoll.poll(0.1):
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if not conn.connected:  # connected (or failed)
                    err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._end_churn(conn, f"connect: {os.strerror(err)}")
                        continue
                    conn.connected = True
                    churned += 1  # each connection's message differs from the one before
                    conn.expected = self.patterns.message(churned + self.index)
                    if conn.sock.family != socket.AF_UNIX:
                        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.sock.send(conn.expected)
                    self.epoll.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._end_churn(conn, f"recv: {exc.strerror or exc}")
                    continue
                if not data:
                    self._end_churn(conn, "closed by server")
                    continue
                conn.got += data
                if len(conn.got) < cfg.size:
                    continue
                if conn.got != conn.expected:
                    res.mismatches += 1
                    self._end_churn(conn, "")
                    continue
                t = time.monotonic()
                res.record(int((t - conn.t0) * 1e6), t)
                self._end_churn(conn, "")
            self.progress.value = res.requests
        res.bytes = res.requests * cfg.size * 2

    def _start_churn(self) -> None:
        target = self.cfg.target
        unix = kind(target.scheme).unix
        family = (
            socket.AF_UNIX if unix else (socket.AF_INET6 if ":" in target.host else socket.AF_INET)
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = _Conn(sock)
        conn.t0 = time.monotonic()
        try:
            sock.connect(target.path if unix else (target.host, target.port))
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EINPROGRESS:
                self.result.errors[f"connect: {exc.strerror or exc}"] += 1
                sock.close()
                time.sleep(0.01)
                return
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def _end_churn(self, conn: _Conn, error: str) -> None:
        if error:
            self.result.errors[error] += 1
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        self.epoll.unregister(fd)
        conn.sock.close()
        self._start_churn()

    # -- udp --------------------------------------------------------------------------
    def _run_udp(self) -> None:
        cfg, res = self.cfg, self.result
        for _ in range(self.n):
            try:
                sock = connect(self.cfg.target, cfg.timeout)
            except Unreachable as exc:
                res.errors[f"socket: {exc}"] += 1
                continue
            sock.setblocking(False)
            self.conns[sock.fileno()] = _Conn(sock)
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        self._start()
        for conn in self.conns.values():
            self._send_datagram(conn)
        deadline = res.mono_start + cfg.duration
        next_check = time.monotonic() + CHECK_EVERY
        while time.monotonic() < deadline:
            for fd, _ in self.epoll.poll(0.1):
                conn = self.conns[fd]
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionRefusedError:
                    res.errors["port unreachable"] += 1
                    continue
                if data != conn.expected:
                    if len(data) >= 8 and data[:8] != conn.expected[:8]:
                        self._old_answer(conn, data)
                        continue
                    res.mismatches += 1
                else:
                    t = time.monotonic()
                    res.record(int((t - conn.t0) * 1e6), t)
                self._send_datagram(conn)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_EVERY
                for conn in self.conns.values():
                    if now - conn.t0 > UDP_TIMEOUT:
                        if now >= res.mono_start:
                            res.lost += 1
                        if len(conn.lost) > 1024:  # bounded: very late answers then count
                            conn.lost.clear()  # as duplicates
                        conn.lost.add(conn.seq)
                        self._send_datagram(conn)
            self.progress.value = res.requests
        res.bytes = res.requests * cfg.size * 2

    def _datagram(self, seq: int) -> bytes:
        header = (seq * 1000 + self.index).to_bytes(8, "big")
        return (header + self.patterns.message(seq))[: max(self.cfg.size, 8)]

    def _old_answer(self, conn: _Conn, data: bytes) -> None:
        """An answer to an earlier datagram: late (it was counted lost), or a duplicate.
        Its bytes are checked all the same."""
        seq = int.from_bytes(data[:8], "big") // 1000
        if not 0 < seq < conn.seq or data != self._datagram(seq):
            self.result.mismatches += 1
        elif seq in conn.lost:
            conn.lost.discard(seq)
            self.result.late += 1
        else:
            self.result.duplicates += 1

    def _send_datagram(self, conn: _Conn) -> None:
        conn.seq += 1
        conn.expected = self._datagram(conn.seq)
        conn.t0 = time.monotonic()
        try:
            conn.sock.send(conn.expected)
        except BlockingIOError:
            self.result.lost += 1
        except ConnectionRefusedError:
            self.result.errors["port unreachable"] += 1


class PingPong:
    """The ping-pong loop in Python: tools/_native.c's twin, rule for rule."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        cfg = worker.cfg
        self.cfg, self.res, self.epoll = cfg, worker.result, worker.epoll
        self.size = cfg.size
        self.open = worker.rate > 0
        self.depth = cfg.in_flight if self.open else 1
        self.peers: list[_Peer] = []
        self.by_fd: dict[int, _Peer] = {}
        self.heap: list[tuple[float, int]] = []  # (next slot, peer index)
        self.interval = 0.0
        self.mstart = 0.0
        self.late = LATE_SEND_US * 1e-6

    def gap(self) -> float:
        if self.cfg.arrival == "poisson":
            return -math.log(1.0 - self.w.rng.random()) * self.interval
        return self.interval

    def run(self) -> None:
        cfg, res = self.cfg, self.res
        for _ in range(self.w.n):
            sock = self.w._connect()
            if sock is not None:
                peer = _Peer(sock, len(self.peers))
                self.peers.append(peer)
                self.by_fd[sock.fileno()] = peer
                self.epoll.register(sock.fileno(), select.EPOLLIN)
        start = self.w._start()
        self.mstart = res.mono_start
        deadline = self.mstart + cfg.duration
        n = len(self.peers)
        self.interval = n / self.w.rate if self.open and n else 0.0
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
                        self.replace(i, "no complete answer within the timeout")
                self.w.progress.value = res.requests
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
                res.errors["no answer within the timeout"] += 1
        for peer in self.peers:
            self.w.socks[peer.sock.fileno()] = peer.sock
        res.bytes = res.requests * self.size * 2

    def fill(self, i: int, t: float) -> None:
        """Send every request whose slot has come and for which there is room."""
        peer = self.peers[i]
        if not self.open:
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
        if self.open and intended >= self.mstart:
            self.res.sends += 1
            self.res.lateness_us[int((t - intended) * 1e6)] += 1
            if t - intended > self.late:
                if held:
                    self.res.held_sends += 1
                else:
                    self.res.late_sends += 1
        if peer.unsent > 1:
            return True  # it goes once those before it are out
        try:  # nothing waits before it: straight to the kernel (the usual case)
            n = peer.sock.send(message)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.replace(i, f"send: {exc.strerror or exc}")
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
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.replace(i, f"send: {exc.strerror or exc}")
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
        return self.w.patterns.message(seq * 7 + self.w.index)

    def readable(self, i: int) -> None:
        """Match what came back to the requests in flight by position, and verify it."""
        peer = self.peers[i]
        try:
            data = peer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.replace(i, f"recv: {exc.strerror or exc}")
            return
        if not data:
            self.replace(i, "closed by server")
            return
        if peer.received + len(data) > peer.sent:
            self.res.mismatches += 1  # more bytes back than were sent
            self.replace(i, None)
            return
        peer.received += len(data)
        t = time.monotonic()
        size, off = self.size, 0
        if not peer.got and len(data) == size and len(peer.inflight) == 1:  # one whole echo
            entry = peer.inflight[0]
            if data != entry.message:
                self.res.mismatches += 1
                self.replace(i, None)
                return
            peer.inflight.popleft()
            self.answered(entry, t)
            self.fill(i, t)
            return
        while off < len(data):
            entry = peer.inflight[0]
            take = min(size - peer.got, len(data) - off)
            expected = entry.message
            if data[off : off + take] != expected[peer.got : peer.got + take]:
                self.res.mismatches += 1
                self.replace(i, None)  # out of step: a new connection
                return
            peer.got += take
            off += take
            if peer.got == size:
                peer.inflight.popleft()
                peer.got = 0
                self.answered(entry, t)
        self.fill(i, t)

    def answered(self, entry: _Request, t: float) -> None:
        if entry.intended >= self.mstart:  # not the warm-up
            self.res.record(int((t - entry.intended) * 1e6), t)
            if self.open:
                self.res.uncorrected_us[int((t - entry.sent) * 1e6)] += 1

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
            self.res.errors[reason] += 1
            self.w._pause()
        peer.inflight.clear()
        peer.unsent = peer.got = peer.sent = peer.received = 0
        peer.out = None
        peer.writing = False
        sock = self.w._connect()
        if sock is None:
            return  # none to be had: this slot rests (its socket is closed: fileno -1)
        peer.sock = sock
        self.by_fd[sock.fileno()] = peer
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.fill(i, time.monotonic())


def worker_main(
    cfg: BenchConfig,
    connections: int,
    rate: float,
    index: int,
    progress: Any,
    results: Any,
    probe: bool = False,
) -> None:
    """One load process: its share of the connections and of the rate (``probe``: the
    latency-under-load flow)."""
    try:
        if kind(cfg.target.scheme).served_by in (QUIC, DTLS):
            from socket_echo.tools.bench.secure import SecureWorker

            result = SecureWorker(cfg, connections, rate, index, progress).run()
        else:
            result = Worker(cfg, connections, rate, index, progress).run()
        result.probe = probe
        results.put((index, result))
    except Exception as exc:  # reported by the parent as this worker's error
        failed = WorkerResult()
        failed.errors[f"worker failed: {exc!r}"] += 1
        results.put((index, failed))
