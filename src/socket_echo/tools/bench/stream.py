"""bench ``--mode stream``: every connection sends and receives at once, up to STREAM_WINDOW
bytes in flight, and what comes back is compared with what went out, byte for byte (a pattern
of STREAM_PERIOD bytes, so an offset says which byte is owed)."""

from __future__ import annotations

import select
import time

from socket_echo.tools.bench import errors
from socket_echo.tools.bench.loop import WOULD_BLOCK, Loop

STREAM_WINDOW = 4 << 20  # bytes in flight per stream connection at most
STREAM_PERIOD = 1 << 20


class Stream(Loop):
    def serve(self) -> None:
        cfg, res = self.cfg, self.result
        size = cfg.size
        period = max(STREAM_PERIOD, size)
        # Two copies of one period: byte at absolute offset p is always buf[p % period], also
        # for a chunk that starts before a period boundary and ends after it.
        buf = bytes((i * 2654435761 >> 13) & 0xFF for i in range(period)) * 2
        view = memoryview(buf)
        for _ in range(self.n):
            conn = self.open()
            if conn:
                self.epoll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        sent: dict[int, int] = dict.fromkeys(self.conns, 0)
        got: dict[int, int] = dict.fromkeys(self.conns, 0)
        counted: dict[int, int] = dict.fromkeys(self.conns, 0)  # bytes in the window
        slot = {fd: i for i, fd in enumerate(self.conns)}
        res.slots(len(self.conns))
        self.start()
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
                        except WOULD_BLOCK:
                            break
                        except OSError as exc:
                            res.errors[errors.because(errors.SEND, exc.strerror or exc)] += 1
                            return
                        sent[fd] += n
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    try:
                        data = conn.sock.recv(1 << 18)
                    except WOULD_BLOCK:
                        data = None
                    except OSError as exc:
                        res.errors[errors.because(errors.RECV, exc.strerror or exc)] += 1
                        return
                    if data == b"":
                        res.errors[errors.CLOSED_BY_SERVER] += 1
                        return
                    if data:
                        off = got[fd] % period
                        if data != view[off : off + len(data)]:
                            res.mismatches += 1
                            return
                        got[fd] += len(data)
                        if counting:
                            res.bytes += len(data)
                            if not counted[fd]:
                                res.first_answer[slot[fd]] = now - measured_from
                            counted[fd] += len(data)
                flags = select.EPOLLIN
                if sent[fd] - got[fd] < STREAM_WINDOW:
                    flags |= select.EPOLLOUT
                self.epoll.modify(fd, flags)
            self.progress.value = res.bytes
        res.requests = res.bytes // size
        res.answers = [counted[fd] // size for fd in slot]  # writes' worth echoed, each
