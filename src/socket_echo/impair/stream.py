"""An impaired stream echo: each chunk comes back after ``delay`` + up to ``jitter``, at most
``rate`` bytes/s, and the connection is reset (or closed) once ``reset-after`` (``close-after``)
bytes were echoed. Byte order is always kept: a chunk never leaves before the one before it.

One timer per connection (the head of its queue), never one per chunk. Bytes waiting for
their time count against ``--max-buffer`` with those the transport holds: past it, reading
from that peer stops until they are out, so a fast sender against a long delay cannot grow
memory.

Memory is bounded by the bytes held, not by how they arrived: what waits is kept in at most
``MAX_RANGES`` ranges, each the bytes, how many of them already left and the time they may
leave (not a queue entry per arrival or per rate slice: ``?rate=1`` once cut every byte into an
object of its own, ~46 MiB for the 256 KiB a connection may hold). An arrival is kept as the
``bytes`` it came in (no copy: the ping-pong through ``?rate=`` costs what it did before the
ranges); only a join makes a ``bytearray``. An arrival due within ``MERGE_WITHIN`` of
the last range joins it; one that finds ``MAX_RANGES`` ranges waiting first joins the two
closest in time, at the later time. Either way a byte may leave a little later, never earlier.
The rate is applied as bytes leave (in ``Impairments.rate_slice`` pieces), not when
they arrive. So a connection holds at most ``--max-buffer`` (plus one read) of data, a
bytearray's slack and ``MAX_RANGES`` small lists, whatever the rate, delay or jitter.

The connection's lifecycle (admission, reasons, counters, log records, the sweep and the
drain) is lifecycle.py's, as on every stream path.

A reset after N bytes: the N bytes are written, then (once the transport has handed them to
the kernel) the socket closes with SO_LINGER 0, which sends RST. On loopback the peer reads
the N bytes, then ECONNRESET; on a real path a RST can overtake data still in flight, as it
would from any host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
from typing import Any

from socket_echo.impair.clock import call_when_due, now
from socket_echo.lifecycle import (
    CLOSE_AFTER,
    LINGER_ABORT,
    PEER_CLOSED,
    RESET_AFTER,
    ListenerContext,
    lost_reason,
)
from socket_echo.tcp.protocol import EchoProtocol

MAX_RANGES = 64  # ranges waiting per connection at most; past it an arrival joins the last one
MERGE_WITHIN = 0.001  # s: an arrival due this close to the last range joins it (timer's grain)
DUE, DATA, SENT = 0, 1, 2  # a range: [when its bytes may leave, the bytes, how many left]
DRAIN_POLL = 0.005  # reset-after: how often to look whether the last bytes reached the kernel


class ImpairedEcho(EchoProtocol):
    """The plain echo's connection handling (admission, flow-control limits, the TLS EOF
    rule), with a queue between what arrives and what goes back."""

    __slots__ = (
        "echoed",
        "eof",
        "finishing",
        "queue",
        "queued",
        "rate_at",
        "read_paused",
        "rng",
        "timer",
    )

    def __init__(self, ctx: ListenerContext, peer: Any = None) -> None:
        super().__init__(ctx, peer)
        assert ctx.impair is not None
        seed = ctx.impair.seed
        self.rng = random.Random(seed) if seed is not None else random.Random()
        self.queue: collections.deque[list[Any]] = collections.deque()  # [due, bytes, sent]
        self.queued = 0  # bytes waiting in the queue
        self.rate_at = 0.0  # with ?rate=: when the next byte may leave
        self.echoed = 0
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False
        self.finishing = False  # reset-after / close-after reached
        self.read_paused = False

    # -- per connection (connection_made is the plain echo's) -------------------------
    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.closing or self.finishing:
            self.unsent += len(data)  # nothing more is echoed
            return
        imp = self.ctx.impair
        assert imp is not None
        due = now() + imp.delay + (self.rng.random() * imp.jitter if imp.jitter else 0.0)
        if imp.delay or imp.jitter:
            self.ctx.applied[(self.ctx.listener, "delayed")] += 1
        queue = self.queue
        if queue and due <= queue[-1][DUE] + MERGE_WITHIN:
            last = queue[-1]
            last[DUE] = max(last[DUE], due)  # never before the bytes before it
            _join(last, data)
        else:
            if len(queue) >= MAX_RANGES:
                self._make_room()
            if queue:
                due = max(due, queue[-1][DUE])  # byte order: never before the range before
            queue.append([due, data, 0])
        self.queued += len(data)
        self._flow()
        self._arm()

    def eof_received(self) -> bool | None:
        self.give_reason(PEER_CLOSED)
        self.eof = True  # echo what is queued, then close
        if not self.queue:
            self.transport.close()
        return self.keep_open_after_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if exc is not None:
            self.give_reason(*lost_reason(exc))
        self.released(self.unsent + self.queued)
        self.queue.clear()
        self.queued = 0

    # -- the queue ------------------------------------------------------------------------
    def _make_room(self) -> None:
        """The two neighbouring ranges closest in time become one, at the later time: of all
        the joins, the one that makes bytes leave least late (at most the gap, about the
        queue's span / MAX_RANGES)."""
        queue = self.queue
        gaps = [queue[i + 1][DUE] - queue[i][DUE] for i in range(len(queue) - 1)]
        i = gaps.index(min(gaps))
        later = queue[i + 1]
        _join(queue[i], memoryview(later[DATA])[later[SENT] :])
        queue[i][DUE] = later[DUE]
        del queue[i + 1]

    def _arm(self) -> None:
        if self.timer is None and self.queue:
            due = self.queue[0][DUE]
            if due < self.rate_at:  # with ?rate=: the head also waits for the rate (0 without)
                due = self.rate_at
            self.timer = call_when_due(self.ctx.loop, due, self._release)

    def _arm_at(self, when: float) -> None:
        self.timer = call_when_due(self.ctx.loop, when, self._release)

    def _release(self) -> None:
        """What is due leaves: whole ranges, or with ?rate= slices of the head at the rate;
        then the timer is armed for what is next."""
        self.timer = None
        t = now()
        imp = self.ctx.impair
        assert imp is not None
        queue = self.queue
        while queue and queue[0][DUE] <= t and not self.transport.is_closing():
            head = queue[0]
            data: bytes | bytearray = head[DATA]
            sent = head[SENT]
            end = len(data)
            if imp.rate:
                start = head[DUE] if head[DUE] > self.rate_at else self.rate_at
                if start > t:  # the rate holds the head back
                    self._arm_at(start)
                    break
                if end - sent > imp.rate_slice:
                    end = sent + imp.rate_slice
                self.rate_at = start + (end - sent) / imp.rate
            # the whole range is handed over as it is (never changed after), a part as a copy
            chunk = data if sent == 0 and end == len(data) else data[sent:end]
            if end == len(data):
                queue.popleft()
            else:
                head[SENT] = end
            self.queued -= len(chunk)
            self._write(chunk)
            if self.finishing:
                return
        if self.transport.is_closing() or self.finishing:
            return
        self._flow()
        if self.timer is None:
            self._arm()
        if (self.eof or self.closing) and not self.queue:
            self.transport.close()

    def _write(self, chunk: bytes | bytearray) -> None:
        imp = self.ctx.impair
        assert imp is not None
        limit = imp.reset_after or imp.close_after
        if limit and self.echoed + len(chunk) >= limit:
            take = limit - self.echoed
            self.transport.write(chunk[:take])
            self.echoed += take
            self.finishing = True
            self.unsent += len(chunk) - take + self.queued  # never echoed
            self.queue.clear()
            self.queued = 0
            if imp.reset_after:
                self.ctx.applied[(self.ctx.listener, "reset")] += 1
                self.give_reason(RESET_AFTER)
                self._reset_when_written()
            else:
                self.ctx.applied[(self.ctx.listener, "closed")] += 1
                self.give_reason(CLOSE_AFTER)
                self.transport.close()
            return
        self.transport.write(chunk)
        self.echoed += len(chunk)

    def _reset_when_written(self) -> None:
        """RST once the transport has handed every byte up to the limit to the kernel."""
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size():
            self.ctx.loop.call_later(DRAIN_POLL, self._reset_when_written)
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
        self.transport.abort()

    def _flow(self) -> None:
        """Stop reading while more than --max-buffer is held (queued + in the transport)."""
        held = self.held()
        if not self.read_paused and held >= self.ctx.max_buffer:
            self.read_paused = True
            self.transport.pause_reading()
        elif self.read_paused and held < self.ctx.max_buffer // 2 and not self.writes_paused:
            self.read_paused = False
            self.drains += 1
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.writes_paused = True
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writes_paused = False
        self.drains += 1
        self._flow()

    # -- asked by the sweep, the drain and the metrics ---------------------------------
    def held(self) -> int:
        if not self.conn_id:
            return 0
        return self.queued + self.transport.get_write_buffer_size()

    def close(self, reason: str) -> None:
        self.give_reason(reason)
        self.closing = True
        if not self.queue:
            self.transport.close()

    def abort(self, reason: str) -> None:
        self.give_reason(reason)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.unsent += self.transport.get_write_buffer_size()
        self.transport.abort()


def _join(range_: list[Any], more: bytes | memoryview) -> None:
    """``more`` joins the bytes of ``range_`` still to leave (a ``bytearray`` from then on)."""
    data = range_[DATA]
    if not isinstance(data, bytearray) or range_[SENT]:
        data = range_[DATA] = bytearray(memoryview(data)[range_[SENT] :])
        range_[SENT] = 0
    data += more
