"""bench ``--mode udp``: a datagram ping-pong per socket; one not answered within UDP_TIMEOUT
counts as lost and the next goes out. Every datagram carries its sequence number, so a late
answer (after it was counted lost) and a duplicate are told apart from a wrong one."""

from __future__ import annotations

import select
import time

from socket_echo.tools.bench import errors
from socket_echo.tools.bench.loop import Conn, Loop
from socket_echo.tools.connect.target import Unreachable, connect
from socket_echo.tools.defaults import CHECK_EVERY, UDP_TIMEOUT


class Datagrams(Loop):
    def serve(self) -> None:
        cfg, res = self.cfg, self.result
        for _ in range(self.n):
            try:
                sock = connect(self.cfg.target, cfg.timeout)
            except Unreachable as exc:
                res.errors[errors.because(errors.SOCKET, exc)] += 1
                continue
            sock.setblocking(False)
            conn = self.conns[sock.fileno()] = Conn(sock)
            conn.slot = len(self.conns) - 1
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        res.slots(len(self.conns))
        self.start()
        for conn in self.conns.values():
            self.send(conn)
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
                    res.errors[errors.PORT_UNREACHABLE] += 1
                    continue
                if data != conn.expected:
                    if len(data) >= 8 and data[:8] != conn.expected[:8]:
                        self.old_answer(conn, data)
                        continue
                    res.mismatches += 1
                else:
                    t = time.monotonic()
                    res.record(int((t - conn.t0) * 1e6), t, conn.slot)
                self.send(conn)
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
                        self.send(conn)
            self.progress.value = res.requests
        res.bytes = res.requests * cfg.size * 2

    def datagram(self, seq: int) -> bytes:
        header = (seq * 1000 + self.index).to_bytes(8, "big")
        return (header + self.patterns.message(seq))[: max(self.cfg.size, 8)]

    def old_answer(self, conn: Conn, data: bytes) -> None:
        """An answer to an earlier datagram: late (it was counted lost), or a duplicate.
        Its bytes are checked all the same."""
        seq = int.from_bytes(data[:8], "big") // 1000
        if not 0 < seq < conn.seq or data != self.datagram(seq):
            self.result.mismatches += 1
        elif seq in conn.lost:
            conn.lost.discard(seq)
            self.result.late += 1
        else:
            self.result.duplicates += 1

    def send(self, conn: Conn) -> None:
        conn.seq += 1
        conn.expected = self.datagram(conn.seq)
        conn.t0 = time.monotonic()
        try:
            conn.sock.send(conn.expected)
        except BlockingIOError:
            self.result.lost += 1
        except ConnectionRefusedError:
            self.result.errors[errors.PORT_UNREACHABLE] += 1
