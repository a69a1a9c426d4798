"""A userspace fault proxy for the tests, in the spirit of Toxiproxy.

This machine's kernel has no netem qdisc, so faults on the path come from here: a TCP proxy
whose two directions each have their own switchable faults (latency and jitter, a bandwidth
cap, slicing writes into small segments with delays, stalling, a half-close or a reset at a
chosen byte), and a UDP proxy that drops, duplicates and reorders datagrams. Why by hand:
Toxiproxy is a Go binary CI would have to fetch; these are threads over plain sockets, bound to
loopback, and deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import random
import socket
import struct
import threading
import time
from typing import Any

DATA, FIN, RESET = "data", "fin", "reset"
REORDER_DELAY = 0.05  # seconds a reordered datagram waits at most for one to overtake it


@dataclasses.dataclass
class Faults:
    """Faults of one direction of a TCP connection. Change them at any time."""

    latency: float = 0.0  # seconds added to every chunk
    jitter: float = 0.0  # up to this much more, at random (order is kept, as TCP does)
    bandwidth: float = 0.0  # bytes/s; 0 = unlimited
    slice_min: int = 0  # >0: forward in segments of slice_min..slice_max bytes ...
    slice_max: int = 0
    slice_delay: float = 0.0  # ... with up to this much pause between them
    stalled: bool = False  # stop forwarding (and reading) until cleared
    half_close_at: int | None = None  # after this many bytes: FIN onward, forward no more
    reset_at: int | None = None  # after this many bytes: reset both sides

    def set(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class _Pipe:
    """One direction: a reader thread that applies the faults and a writer thread that
    delivers on schedule."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, faults: Faults, conn: _Connection, seed: int
    ) -> None:
        self.src, self.dst, self.faults, self.conn = src, dst, faults, conn
        self.rand = random.Random(seed)
        self.queue: queue.Queue[tuple[float, str, bytes]] = queue.Queue()  # (due, kind, data)
        self.forwarded = 0
        self.last_due = 0.0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        f = self.faults
        while not self.conn.closed:
            while f.stalled and not self.conn.closed:
                time.sleep(0.01)
            try:
                data = self.src.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.queue.put((self.last_due, FIN, b""))
                return
            limits = [n - self.forwarded for n in (f.half_close_at, f.reset_at) if n is not None]
            if limits and min(limits) < len(data):
                data = data[: max(0, min(limits))]
            self.forwarded += len(data)
            for piece in self._pieces(data):
                self.queue.put((self._due(len(piece)), DATA, piece))
            if f.reset_at is not None and self.forwarded >= f.reset_at:
                self.queue.put((self.last_due, RESET, b""))
                return
            if f.half_close_at is not None and self.forwarded >= f.half_close_at:
                self.queue.put((self.last_due, FIN, b""))
                return

    def _pieces(self, data: bytes) -> list[bytes]:
        f = self.faults
        if f.slice_max <= 0:
            return [data]
        pieces, i = [], 0
        while i < len(data):
            n = self.rand.randint(max(1, f.slice_min), max(1, f.slice_max))
            pieces.append(data[i : i + n])
            i += n
        return pieces

    def _due(self, size: int) -> float:
        f = self.faults
        now = time.monotonic()
        due = now + f.latency + self.rand.uniform(0, f.jitter)
        if f.slice_max > 0 and f.slice_delay > 0:
            due = max(due, self.last_due + self.rand.uniform(0, f.slice_delay))
        if f.bandwidth > 0:
            due = max(due, self.last_due) + size / f.bandwidth
        self.last_due = max(due, self.last_due)  # TCP keeps order: never before the last one
        return self.last_due

    def _write(self) -> None:
        while True:
            due, kind, data = self.queue.get()
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if kind == FIN:
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                self.conn.direction_done()
                return
            if kind == RESET:
                self.conn.reset()
                return
            try:
                self.dst.sendall(data)
            except OSError:
                self.conn.reset()
                return


class _Connection:
    def __init__(
        self, client: socket.socket, upstream: socket.socket, proxy: TcpFaultProxy, seed: int
    ) -> None:
        self.client, self.upstream = client, upstream
        self.closed = False
        self._done = 0
        self._lock = threading.Lock()
        _Pipe(client, upstream, proxy.upstream_faults, self, seed)
        _Pipe(upstream, client, proxy.downstream_faults, self, seed + 1)

    def direction_done(self) -> None:
        with self._lock:
            self._done += 1
            if self._done == 2:
                self.closed = True
                self.client.close()
                self.upstream.close()

    def reset(self) -> None:
        with self._lock:
            self.closed = True
            _reset(self.client)
            _reset(self.upstream)


class TcpFaultProxy:
    """Listens on 127.0.0.1:<free port> and forwards each connection to ``target``.
    ``upstream_faults`` act on client -> server bytes, ``downstream_faults`` on the echo."""

    def __init__(self, target: tuple[str, int], seed: int = 1) -> None:
        self.target = target
        self.upstream_faults = Faults()
        self.downstream_faults = Faults()
        self.seed = seed
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            _Connection(client, upstream, self, self.seed * 1000 + self.connections)

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> TcpFaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpFaultProxy:
    """Forwards datagrams from clients to ``target`` (one upstream socket per client, so the
    server sees distinct sources) and answers back, dropping, duplicating and reordering at
    the given rates, in both directions."""

    def __init__(
        self,
        target: tuple[str, int],
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        seed: int = 1,
    ) -> None:
        self.target = target
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        self.rand = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "dropped": 0, "duplicated": 0, "reordered": 0}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.upstreams: dict[Any, socket.socket] = {}
        self.held: dict[int, tuple[socket.socket, bytes, Any]] = {}  # one held back per way
        threading.Thread(target=self._from_clients, daemon=True).start()

    def _emit(self, way: int, sock: socket.socket, data: bytes, to: Any) -> None:
        """Send one datagram with the faults; ``way`` 0 = to the server, 1 = back."""
        with self.lock:
            roll = self.rand.random()
            if roll < self.drop:
                self.counts["dropped"] += 1
                return
            copies = 2 if self.rand.random() < self.duplicate else 1
            self.counts["duplicated"] += copies - 1
            if way not in self.held and self.rand.random() < self.reorder:
                held = self.held[way] = (sock, data, to)  # goes out after the next one ...
                self.counts["reordered"] += 1
                # ... or after REORDER_DELAY when no next one comes (netem's reordering is a
                # delay too): a lock-step exchange would otherwise wait for its own timers
                timer = threading.Timer(REORDER_DELAY, self._release, args=(way, held))
                timer.daemon = True
                timer.start()
                return
            out = [(sock, data, to)] * copies
            if way in self.held:
                out.append(self.held.pop(way))
            self.counts["forwarded"] += 1
        for s, d, t in out:
            with contextlib.suppress(OSError):
                s.sendto(d, t)

    def _release(self, way: int, held: tuple[socket.socket, bytes, Any]) -> None:
        with self.lock:
            if self.held.get(way) is not held:
                return  # a later datagram took it along already
            del self.held[way]
        sock, data, to = held
        with contextlib.suppress(OSError):
            sock.sendto(data, to)

    def _from_clients(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(65535)
            except OSError:
                return
            up = self.upstreams.get(client)
            if up is None:
                up = self.upstreams[client] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.bind(("127.0.0.1", 0))
                threading.Thread(target=self._from_server, args=(up, client), daemon=True).start()
            self._emit(0, up, data, self.target)

    def _from_server(self, up: socket.socket, client: Any) -> None:
        while True:
            try:
                data = up.recv(65535)
            except OSError:
                return
            self._emit(1, self.sock, data, client)

    def close(self) -> None:
        self.sock.close()
        for up in self.upstreams.values():
            up.close()

    def __enter__(self) -> UdpFaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
