"""``socket-echo bench``: a verifying load generator for any echo server.

Each worker process runs a plain epoll loop (no asyncio: the load generator must cost less
than the server it measures). Every byte that comes back is compared with what was sent.
Latencies are counted per microsecond in a dict (one add per request) and merged into an
HdrHistogram at the end. ``--rate`` runs an open loop as wrk2 does: each request has an
intended send time, and its latency counts from then, so a stalled server cannot hide its
stalls by slowing the client down (coordinated omission).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import multiprocessing
import os
import select
import socket
import time
from collections import Counter
from typing import Any

from socket_echo.config import DEFAULT_UDP_BURST, DEFAULT_UDP_MAX_RATE, DEFAULT_UDP_RATE
from socket_echo.kinds import kind
from socket_echo.tools.bench_model import BenchConfig, WorkerResult, cpu_seconds
from socket_echo.tools.target import (
    Patterns,
    Unreachable,
    connect,
    is_loopback,
)

__all__ = ["BenchConfig", "WorkerResult"]  # the model, here too for the tools' callers

_native: Any
try:  # the closed-loop ping-pong in C (tools/_native.c); the Python loop below is its twin
    from socket_echo.tools import _native  # type: ignore[attr-defined,no-redef,unused-ignore]
except ImportError:
    _native = None


def native_pingpong(cfg: BenchConfig) -> bool:
    """Whether the C loop runs this ping-pong: closed loop over plain TCP or a Unix socket,
    where the extension is built and SOCKET_ECHO_NO_EXTENSIONS is not set."""
    return (
        _native is not None
        and not os.environ.get("SOCKET_ECHO_NO_EXTENSIONS")
        and not cfg.rate
        and kind(cfg.target.scheme).engine
    )


MODES = ("pingpong", "stream", "churn", "udp")
STREAM_WINDOW = 4 << 20  # bytes in flight per stream connection at most
STREAM_PERIOD = 1 << 20
UDP_TIMEOUT = 1.0  # a datagram not answered by then counts as lost and is sent anew
SATURATED = 0.90  # a worker busier than this measured itself, not the server


class _Conn:
    __slots__ = ("expected", "got", "intended", "lost", "out", "seq", "sock", "state", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.expected = b""
        self.out: memoryview | None = None  # the rest of a message the kernel did not take
        self.got = b""
        self.t0 = 0.0
        self.intended = 0.0
        self.seq = 0
        self.state = 0
        self.lost: set[int] = set()  # UDP: sequence numbers counted lost, for late answers


class Worker:
    def __init__(self, cfg: BenchConfig, connections: int, index: int, progress: Any) -> None:
        self.cfg = cfg
        self.n = connections
        self.index = index
        self.progress = progress
        self.result = WorkerResult()
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.patterns = Patterns(cfg.size)
        # pingpong: connections waiting for their intended send time (open loop), and the
        # interval between one connection's requests (0: closed loop, send on each answer)
        self.due: list[tuple[float, int]] = []
        self.interval = 0.0

    def run(self) -> WorkerResult:
        cpu0 = cpu_seconds()
        started = time.perf_counter()
        getattr(self, f"_run_{self.cfg.mode}")()
        self.result.elapsed = time.perf_counter() - started
        self.result.cpu_seconds = cpu_seconds() - cpu0
        for conn in self.conns.values():
            conn.sock.close()
        self.epoll.close()
        return self.result

    # -- connections ------------------------------------------------------------------
    def _open(self) -> _Conn | None:
        try:
            sock = connect(self.cfg.target, self.cfg.timeout)
        except Unreachable as exc:
            self.result.errors[f"connect: {exc}"] += 1
            return None
        sock.setblocking(False)
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        return conn

    def _drop(self, conn: _Conn, reason: str) -> _Conn | None:
        """An error on one connection: count it, replace the connection (the caller gives
        the new one its first message: :meth:`_restart`)."""
        self.result.errors[reason] += 1
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)
        conn.sock.close()
        time.sleep(0.001 * min(self.result.errors.total(), 100))  # no busy loop on a dead server
        return self._open()

    def _send_next(self, conn: _Conn, now: float, intended: float) -> None:
        conn.seq += 1
        conn.expected = self.patterns.message(conn.seq * 7 + self.index)
        conn.got = b""
        conn.t0 = intended
        try:
            sent = conn.sock.send(conn.expected)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._restart(conn, f"send: {exc.strerror or exc}")
            return
        if sent < len(conn.expected):  # the rest goes when the socket is writable again;
            conn.out = memoryview(conn.expected)[sent:]  # a stall is caught by the timeout
            self.epoll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _send_rest(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._restart(conn, f"send: {exc.strerror or exc}")
            return
        conn.out = conn.out[sent:] if sent < len(conn.out) else None
        if conn.out is None:
            self.epoll.modify(conn.sock.fileno(), select.EPOLLIN)

    # -- pingpong (closed or open loop) -----------------------------------------------
    def _run_pingpong(self) -> None:
        if native_pingpong(self.cfg):
            self._run_pingpong_native()
            return
        cfg, res = self.cfg, self.result
        for _ in range(self.n):
            self._open()
        interval = self.interval = (cfg.connections / cfg.rate) if cfg.rate else 0.0
        start = time.perf_counter()
        deadline = start + cfg.duration
        due = self.due
        for i, first in enumerate(list(self.conns.values())):
            if interval:
                first.intended = start + interval * i / max(1, self.n)
                heapq.heappush(due, (first.intended, first.sock.fileno()))
            else:
                self._send_next(first, start, start)
        size = cfg.size
        latency = res.latency_us
        conns = self.conns
        progress = self.progress
        next_check = start + 0.1
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            if now >= next_check:  # a request unanswered this long: the server lost bytes
                next_check = now + 0.1
                for late in list(conns.values()):
                    if (
                        late.expected
                        and late.t0 < now - cfg.timeout
                        and (not interval or late.intended <= now)
                    ):
                        self._restart(late, "no complete answer within the timeout")
            while due and due[0][0] <= now:
                intended, fd = heapq.heappop(due)
                conn = conns.get(fd)
                if conn is not None:
                    self._send_next(conn, now, intended)
            wait = deadline - now
            if due:
                wait = min(wait, max(0.0, due[0][0] - now))
            for fd, events in self.epoll.poll(min(wait, 0.1)):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if conn.out is not None:
                    if events & select.EPOLLOUT:
                        self._send_rest(conn)
                    if not events & select.EPOLLIN:
                        continue
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._restart(conn, f"recv: {exc.strerror or exc}")
                    continue
                if not data:
                    self._restart(conn, "closed by server")
                    continue
                got = conn.got + data if conn.got else data
                if len(got) < size:
                    conn.got = got
                    continue
                t = time.perf_counter()
                if got != conn.expected:
                    res.mismatches += 1
                    self._restart(conn, None)  # out of step: a new connection
                    continue
                latency[int((t - conn.t0) * 1e6)] += 1
                res.requests += 1
                if interval:
                    conn.intended += interval
                    if conn.intended > t:
                        conn.got = b""
                        heapq.heappush(due, (conn.intended, fd))
                        continue
                    self._send_next(conn, t, conn.intended)
                else:
                    self._send_next(conn, t, t)
            progress.value = res.requests
        now = time.perf_counter()
        for conn in conns.values():
            if conn.expected and not interval and now - conn.t0 > cfg.timeout:
                res.errors["no answer within the timeout"] += 1
        res.bytes = res.requests * size * 2

    def _run_pingpong_native(self) -> None:
        """The same loop in C: Python opens the connections, replaces those that fail and
        shows progress; C sends, reads, compares and times every message."""
        cfg, res = self.cfg, self.result
        for _ in range(self.n):
            self._open()

        def replace(fd: int, reason: str | None) -> int:
            conn = self.conns.get(fd)
            if conn is None:
                return -1
            new = self._drop(conn, reason) if reason else self._replace(conn)
            return new.sock.fileno() if new is not None else -1

        def tick(requests: int) -> None:
            self.progress.value = requests

        requests, latency, mismatches, late, _ = _native.pingpong(
            list(self.conns),
            cfg.size,
            cfg.duration,
            cfg.timeout,
            self.index,
            self.patterns.base,
            replace,
            tick,
        )
        res.requests += requests
        res.latency_us.update(latency)
        res.mismatches += mismatches
        if late:
            res.errors["no answer within the timeout"] += late
        res.bytes = res.requests * cfg.size * 2

    def _restart(self, conn: _Conn, reason: str | None) -> None:
        """Replace a connection and give the new one its first message, so the number of
        connections at work stays as asked; ``reason`` None = already counted (a mismatch)."""
        if self.conns.get(conn.sock.fileno()) is not conn:
            return  # already replaced (an error seen twice in one round)
        new = self._drop(conn, reason) if reason else self._replace(conn)
        if new is None:
            return
        now = time.perf_counter()  # sent by the main loop, never from here: no recursion
        new.intended = now
        heapq.heappush(self.due, (now, new.sock.fileno()))

    def _replace(self, conn: _Conn) -> _Conn | None:
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        self.epoll.unregister(fd)
        conn.sock.close()
        return self._open()

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
        deadline = time.perf_counter() + cfg.duration
        while time.perf_counter() < deadline:
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
        deadline = time.perf_counter() + cfg.duration
        for _ in range(self.n):
            self._start_churn()
        while time.perf_counter() < deadline:
            for fd, _ in self.epoll.poll(0.1):
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if conn.state == 0:  # connected (or failed)
                    err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._end_churn(conn, f"connect: {os.strerror(err)}")
                        continue
                    conn.state = 1
                    conn.expected = self.patterns.message(res.requests + self.index)
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
                res.latency_us[int((time.perf_counter() - conn.t0) * 1e6)] += 1
                res.requests += 1
                self._end_churn(conn, "")
            self.progress.value = res.requests
        res.bytes = res.requests * cfg.size * 2

    def _start_churn(self) -> None:
        target = self.cfg.target
        family = (
            socket.AF_UNIX
            if target.scheme == "unix"
            else (socket.AF_INET6 if ":" in target.host else socket.AF_INET)
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = _Conn(sock)
        conn.t0 = time.perf_counter()
        try:
            sock.connect(target.path if target.scheme == "unix" else (target.host, target.port))
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
            conn = _Conn(sock)
            self.conns[sock.fileno()] = conn
            self.epoll.register(sock.fileno(), select.EPOLLIN)
            self._send_datagram(conn)
        deadline = time.perf_counter() + cfg.duration
        next_check = time.perf_counter() + 0.1
        while time.perf_counter() < deadline:
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
                    res.latency_us[int((time.perf_counter() - conn.t0) * 1e6)] += 1
                    res.requests += 1
                self._send_datagram(conn)
            now = time.perf_counter()
            if now >= next_check:
                next_check = now + 0.1
                for conn in self.conns.values():
                    if now - conn.t0 > UDP_TIMEOUT:
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
        conn.t0 = time.perf_counter()
        try:
            conn.sock.send(conn.expected)
        except BlockingIOError:
            self.result.lost += 1
        except ConnectionRefusedError:
            self.result.errors["port unreachable"] += 1


def _worker_main(
    cfg: BenchConfig, connections: int, index: int, progress: Any, results: Any
) -> None:
    try:
        if cfg.target.scheme in ("quic", "dtls"):
            from socket_echo.tools.bench_secure import SecureWorker

            result = SecureWorker(cfg, connections, index, progress).run()
        else:
            result = Worker(cfg, connections, index, progress).run()
        results.put((index, result))
    except Exception as exc:  # reported by the parent as this worker's error
        failed = WorkerResult()
        failed.errors[f"worker failed: {exc!r}"] += 1
        results.put((index, failed))


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_workers(cfg: BenchConfig, on_progress: Any = None) -> list[WorkerResult]:
    ctx = multiprocessing.get_context("fork")
    shares = [n for n in split(cfg.connections, cfg.processes) if n > 0]
    counters = [ctx.Value("q", 0, lock=False) for _ in shares]
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(cfg, n, i, counters[i], results), daemon=True)
        for i, n in enumerate(shares)
    ]
    for p in procs:
        p.start()
    collected: dict[int, WorkerResult] = {}
    started = time.monotonic()
    hard_deadline = started + cfg.duration + cfg.timeout + 30
    while len(collected) < len(procs) and time.monotonic() < hard_deadline:
        try:
            index, result = results.get(timeout=0.5)
            collected[index] = result
        except Exception:  # queue.Empty
            pass
        if on_progress is not None:
            on_progress(time.monotonic() - started, sum(int(c.value) for c in counters))
    for p in procs:
        p.join(1)
        if p.is_alive():
            p.kill()
    if len(collected) < len(procs):
        lost = WorkerResult()
        lost.errors["a worker did not report"] += len(procs) - len(collected)
        collected[-1] = lost
    return list(collected.values())


def summarize(cfg: BenchConfig, results: list[WorkerResult]) -> dict[str, Any]:
    from hdrh.histogram import HdrHistogram

    hist = HdrHistogram(1, 3_600_000_000, 3)
    errors: Counter[str] = Counter()
    for r in results:
        for us, count in r.latency_us.items():
            hist.record_value(max(1, us), count)
        errors.update(r.errors)
    elapsed = max((r.elapsed for r in results), default=0.0) or 1e-9
    requests = sum(r.requests for r in results)
    if requests == 0 and not errors:
        errors["no request was answered"] += 1
    cpu = sum(r.cpu_seconds for r in results)
    busiest = max((r.cpu_seconds / r.elapsed for r in results if r.elapsed), default=0.0)
    pct = hist.get_value_at_percentile
    latency = (
        {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "p999": pct(99.9),
            "max": hist.get_max_value(),
        }
        if hist.get_total_count()
        else dict.fromkeys(("p50", "p90", "p99", "p999", "max"), None)
    )
    return {
        "target": cfg.target.url,
        "mode": cfg.mode,
        "requests": requests,
        "requests_per_second": requests / elapsed,
        "megabytes_per_second": sum(r.bytes for r in results) / elapsed / 1e6,
        "latency_us": latency,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "mismatches": sum(r.mismatches for r in results),
        "lost_datagrams": sum(r.lost for r in results),
        "late_datagrams": sum(r.late for r in results),
        "duplicate_datagrams": sum(r.duplicates for r in results),
        "client_cpu_percent": 100 * cpu / elapsed / max(1, len(results)),  # per process
        "client_saturated": busiest >= SATURATED,
        "parameters": {
            "connections": cfg.connections,
            "size": cfg.size,
            "duration": cfg.duration,
            "processes": cfg.processes,
            "rate": cfg.rate or None,
            "timeout": cfg.timeout,
        },
        "_histogram": hist,
    } | {"loss_explanation": explain_losses(cfg, requests, sum(r.lost for r in results), elapsed)}


def explain_losses(cfg: BenchConfig, answered: int, lost: int, elapsed: float) -> str | None:
    """Why UDP answers went missing, in words a user can act on (None when none did)."""
    if cfg.mode != "udp" or not lost:
        return None
    text = (
        f"{lost} of {answered + lost} datagrams got no answer within {UDP_TIMEOUT:g} s "
        f"(each was sent again)"
    )
    rate = answered / elapsed if elapsed else 0.0
    per_source = DEFAULT_UDP_RATE + DEFAULT_UDP_BURST / max(elapsed, 1.0)
    if rate <= 1.2 * per_source:
        text += f"; answers held at about {rate:,.0f}/s, the signature of a per-source rate limit"
    if is_loopback(cfg.target):
        text += (
            ". The target is on this machine: if it is a socket-echo server, its per-source "
            f"limit ({DEFAULT_UDP_RATE:g} datagrams/s per /24 or /56 prefix, burst "
            f"{DEFAULT_UDP_BURST}; all of loopback is one prefix) and its global limit "
            f"({DEFAULT_UDP_MAX_RATE:g}/s) apply to benchmarks too: start it with "
            "--udp-rate 1e7 --udp-burst 100000 --udp-max-rate 1e7 to measure its speed; its "
            "/metrics counts drops by reason (socket_echo_udp_dropped_total)"
        )
    else:
        text += (
            ". A rate limit on the server, a full socket buffer, or loss on the path: the "
            "server's own counters tell which"
        )
    return text


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = summary["_histogram"]
    points = [
        (p, hist.get_value_at_percentile(p))
        for p in (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999, 100)
    ]
    xs = [1 / (1 - p / 100) if p < 100 else 1e6 for p, _ in points]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, [v for _, v in points], marker="o")
    ax.set_xscale("log")
    ax.set_xticks(
        [1, 10, 100, 1000, 10000, 100000, 1e6],
        ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "max"],
    )
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (µs)")
    ax.set_title(
        f"socket-echo bench {summary['mode']} {summary['target']}: "
        f"{summary['requests_per_second']:,.0f} req/s"
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
