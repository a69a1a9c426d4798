"""bench ``--mode udp``: a datagram ping-pong per socket; one not answered within UDP_TIMEOUT
counts as lost and the next goes out. Every datagram carries its sequence number, so a late
answer (after it was counted lost) and a duplicate are told apart from a wrong one."""

from __future__ import annotations

import math
import select
import socket
import time

from socket_echo.tools.bench import errors
from socket_echo.tools.bench.loop import Conn, Loop
from socket_echo.tools.bench.model import ResponderCounts
from socket_echo.tools.connect.target import Unreachable, connect, group_socket
from socket_echo.tools.defaults import CHECK_EVERY, UDP_TIMEOUT


class Datagrams(Loop):
    """The closed loop over UDP sockets; GroupDatagrams changes how a socket is opened, what
    an answer means and what a timeout does (the hooks below), not the loop."""

    def open_socket(self) -> tuple[socket.socket, tuple[object, ...] | None]:
        """A socket for one of --connections, and where it sends (None: it is connected)."""
        return connect(self.cfg.target, self.cfg.timeout), None

    def open_sockets(self) -> None:
        res = self.result
        self.addresses: dict[int, tuple[object, ...] | None] = {}
        for _ in range(self.n):
            try:
                sock, address = self.open_socket()
            except Unreachable as exc:
                res.errors[errors.because(errors.SOCKET, exc)] += 1
                continue
            sock.setblocking(False)
            conn = self.conns[sock.fileno()] = Conn(sock)
            conn.slot = len(self.conns) - 1
            self.addresses[sock.fileno()] = address
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        res.slots(len(self.conns))

    def serve(self) -> None:
        cfg, res = self.cfg, self.result
        self.open_sockets()
        self.start()
        for conn in self.conns.values():
            self.send(conn)
        deadline = res.mono_start + cfg.duration
        next_check = time.monotonic() + CHECK_EVERY
        while time.monotonic() < deadline:
            for fd, _ in self.epoll.poll(0.1):
                self.readable(fd, self.conns[fd])
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_EVERY
                for conn in self.conns.values():
                    if now - conn.t0 > UDP_TIMEOUT:
                        self.timed_out(conn, now)
            self.progress.value = res.requests
        self.finish()
        res.bytes = res.requests * cfg.size * 2

    def readable(self, fd: int, conn: Conn) -> None:
        res = self.result
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionRefusedError:
            res.errors[errors.PORT_UNREACHABLE] += 1
            return
        if data != conn.expected:
            if len(data) >= 8 and data[:8] != conn.expected[:8]:
                self.old_answer(conn, data)
                return
            res.mismatches += 1
        else:
            t = time.monotonic()
            res.record(int((t - conn.t0) * 1e6), t, conn.slot)
        self.send(conn)

    def timed_out(self, conn: Conn, now: float) -> None:
        """No answer within UDP_TIMEOUT: lost, and the next datagram goes out."""
        if now >= self.result.mono_start:
            self.result.lost += 1
        if len(conn.lost) > 1024:  # bounded: very late answers then count as duplicates
            conn.lost.clear()
        conn.lost.add(conn.seq)
        self.send(conn)

    def finish(self) -> None:
        """The run's end (the group's loops settle what is still in flight)."""

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


class GroupDatagrams(Datagrams):
    """bench ``--mode udp`` to a multicast group: each socket sends a datagram to the group and
    sends the next once ``--expect-responders`` members answered it (by default every member
    seen so far), or UDP_TIMEOUT passed. Answers are counted per responder (the source of each
    unicast answer): answered, lost (datagrams sent since its first answer that it never
    answered), duplicated, reordered, and its latencies; every answer is also one of the run's
    requests, so the totals are the group's."""

    def open_socket(self) -> tuple[socket.socket, tuple[object, ...] | None]:
        """A group socket (its own source port: the members' answers come back to it)."""
        return group_socket(self.cfg.target, self.cfg.timeout)

    def open_sockets(self) -> None:
        super().open_sockets()
        self.answered_now: dict[int, set[str]] = {fd: set() for fd in self.conns}
        self.last_seq: dict[tuple[int, str], int] = {}  # per socket and member

    def group_of(self, fd: int) -> tuple[object, ...]:
        address = self.addresses[fd]
        assert address is not None  # a group socket is never connected
        return address

    def readable(self, fd: int, conn: Conn) -> None:
        try:
            data, addr = conn.sock.recvfrom(65536)
        except (BlockingIOError, ConnectionRefusedError):
            return
        self.answer(fd, conn, data, str(addr[0]))

    def timed_out(self, conn: Conn, now: float) -> None:
        self.send(conn)  # whoever did not answer by now is counted lost

    def answer(self, fd: int, conn: Conn, data: bytes, who: str) -> None:
        res = self.result
        t = time.monotonic()
        seq = int.from_bytes(data[:8], "big") // 1000 if len(data) >= 8 else 0
        if not 0 < seq <= conn.seq or data != self.datagram(seq):
            res.mismatches += 1
            return
        counts = res.responders.get(who)
        if counts is None:  # a new member: expected from this datagram on
            counts = res.responders[who] = ResponderCounts(t - res.mono_start)
            counts.expected = 1 if conn.t0 >= res.mono_start else 0
        last = self.last_seq.get((fd, who), 0)
        if (seq == conn.seq and who in self.answered_now[fd]) or (seq < conn.seq and seq <= last):
            counts.duplicates += 1  # it answered this one (or a later one) already
            res.duplicates += 1
            return
        if seq < conn.seq:  # an answer to an earlier datagram than the one in flight
            counts.reordered += 1
            res.late += 1
            self.last_seq[(fd, who)] = seq
            return
        self.answered_now[fd].add(who)
        self.last_seq[(fd, who)] = seq
        counts.last_t = t - res.mono_start
        if t >= res.mono_start and conn.t0 >= res.mono_start:
            us = int((t - conn.t0) * 1e6)
            counts.answered += 1
            counts.latency_us[us] += 1
            res.record(us, t, conn.slot)
        expected = self.cfg.expect_responders or max(1, len(res.responders))
        if len(self.answered_now[fd]) >= expected:
            self.send(conn)

    def send(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        res = self.result
        self.answered_now[fd] = set()
        conn.seq += 1
        conn.expected = self.datagram(conn.seq)
        conn.t0 = time.monotonic()
        if conn.t0 >= res.mono_start:
            for counts in res.responders.values():
                counts.expected += 1
        try:
            conn.sock.sendto(conn.expected, self.group_of(fd))
        except BlockingIOError:
            res.lost += 1
        except OSError as exc:
            res.errors[errors.because(errors.SEND, exc)] += 1

    def finish(self) -> None:
        """The datagrams still in flight at the end are no member's loss."""
        for fd, conn in self.conns.items():
            if conn.t0 < self.result.mono_start:
                continue
            for who, counts in self.result.responders.items():
                if who not in self.answered_now[fd]:
                    counts.expected = max(counts.answered, counts.expected - 1)


class GroupOpenLoop(GroupDatagrams):
    """bench ``--mode udp --rate R`` to a multicast group: each socket sends on a schedule
    (uniform gaps, or poisson arrivals), whoever answers; each member's latency counts from the
    datagram's slot (corrected, as the ping-pong's open loop). A datagram is waited for
    UDP_TIMEOUT; a member that has not answered it by then lost it."""

    def serve(self) -> None:
        cfg, res = self.cfg, self.result
        self.open_sockets()
        # per socket: seq -> (slot, members that answered it), oldest first
        self.pending: dict[int, dict[int, tuple[float, set[str]]]] = {fd: {} for fd in self.conns}
        n = len(self.conns)
        interval = n / self.rate if n else 0.0
        start = self.start()
        slots = {fd: start + interval * i / max(1, n) for i, fd in enumerate(self.conns)}
        deadline = res.mono_start + cfg.duration
        while (now := time.monotonic()) < deadline:
            for fd, conn in self.conns.items():
                while slots[fd] <= now:
                    self.send_at(fd, conn, slots[fd])
                    slots[fd] += self.gap(interval)
            wake = min(min(slots.values(), default=deadline), deadline)
            for fd, _ in self.epoll.poll(max(0.0, min(0.1, wake - time.monotonic()))):
                self.readable(fd, self.conns[fd])
            self.expire(time.monotonic() - UDP_TIMEOUT)
            self.progress.value = res.requests
        # The datagrams of the window's last second get their second too: answers are read
        # until every member answered every one, or UDP_TIMEOUT after the end; then what a
        # member did not answer it lost (a member killed near the end is not let off).
        members = len(res.responders)
        drain_until = deadline + UDP_TIMEOUT
        while (now := time.monotonic()) < drain_until and any(
            len(answered) < members for p in self.pending.values() for _, answered in p.values()
        ):
            for fd, _ in self.epoll.poll(min(0.05, drain_until - now)):
                self.readable(fd, self.conns[fd])
        res.bytes = res.requests * cfg.size * 2

    def gap(self, interval: float) -> float:
        if self.cfg.arrival == "poisson":
            return -math.log(1.0 - self.rng.random()) * interval
        return interval

    def send_at(self, fd: int, conn: Conn, slot: float) -> None:
        res = self.result
        conn.seq += 1
        self.pending[fd][conn.seq] = (slot, set())
        if slot >= res.mono_start:
            res.sends += 1
            for counts in res.responders.values():
                counts.expected += 1
        try:
            conn.sock.sendto(self.datagram(conn.seq), self.group_of(fd))
        except BlockingIOError:
            res.lost += 1
        except OSError as exc:
            res.errors[errors.because(errors.SEND, exc)] += 1

    def answer(self, fd: int, conn: Conn, data: bytes, who: str) -> None:
        res = self.result
        t = time.monotonic()
        seq = int.from_bytes(data[:8], "big") // 1000 if len(data) >= 8 else 0
        if not 0 < seq <= conn.seq or data != self.datagram(seq):
            res.mismatches += 1
            return
        counts = res.responders.get(who)
        entry = self.pending[fd].get(seq)
        if counts is None:
            counts = res.responders[who] = ResponderCounts(t - res.mono_start)
            counts.expected = 1 if entry and entry[0] >= res.mono_start else 0
        if entry is None:  # answered after it was given up on, or twice after that
            res.late += 1
            return
        slot, answered = entry
        if who in answered:
            counts.duplicates += 1
            res.duplicates += 1
            return
        answered.add(who)
        if seq < self.last_seq.get((fd, who), 0):
            counts.reordered += 1
        self.last_seq[(fd, who)] = max(seq, self.last_seq.get((fd, who), 0))
        counts.last_t = t - res.mono_start
        if slot >= res.mono_start:
            us = int((t - slot) * 1e6)
            counts.answered += 1
            counts.latency_us[us] += 1
            res.record(us, t, conn.slot)

    def expire(self, before: float) -> None:
        """Datagrams sent before ``before`` are waited for no longer."""
        for pending in self.pending.values():
            while pending:
                seq = next(iter(pending))
                if pending[seq][0] >= before:
                    break
                del pending[seq]
