"""An impaired stream echo: each chunk comes back after ``delay`` + up to ``jitter``, at most
``rate`` bytes/s, and the connection is reset (or closed) once ``reset-after`` (``close-after``)
bytes were echoed. Byte order is always kept: a chunk never leaves before the one before it.

One timer per connection (the head of its queue), never one per chunk. Bytes waiting for
their time count against ``--max-buffer`` with those the transport holds: past it, reading
from that peer stops until they are out, so a fast sender against a long delay cannot grow
memory. The connection's lifecycle (admission, reasons, counters, log records, the sweep and
the drain) is tcp/lifecycle.py's, as on every stream path.

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
from socket_echo.tcp.lifecycle import (
    CLOSE_AFTER,
    LINGER_ABORT,
    PEER_CLOSED,
    RESET_AFTER,
    ListenerContext,
    lost_reason,
)
from socket_echo.tcp.protocol import EchoProtocol

RATE_SLICES_PER_SECOND = 50  # a rate-limited chunk leaves in 20 ms slices, not in one burst
DRAIN_POLL = 0.005  # reset-after: how often to look whether the last bytes reached the kernel


class ImpairedEcho(EchoProtocol):
    """The plain echo's connection handling (admission, flow-control limits, the TLS EOF
    rule), with a queue between what arrives and what goes back."""

    __slots__ = (
        "echoed",
        "eof",
        "finishing",
        "free_at",
        "queue",
        "queued",
        "read_paused",
        "rng",
        "timer",
    )

    def __init__(self, ctx: ListenerContext, peer: Any = None) -> None:
        super().__init__(ctx, peer)
        assert ctx.impair is not None
        seed = ctx.impair.seed
        self.rng = random.Random(seed) if seed is not None else random.Random()
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0  # bytes waiting in the queue
        self.free_at = 0.0  # when the last queued byte leaves (order and rate)
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
        due = max(due, self.free_at)  # never before the chunk before it
        if imp.delay or imp.jitter:
            self.ctx.applied[(self.ctx.listener, "delayed")] += 1
        if imp.rate:
            piece = max(1, int(imp.rate / RATE_SLICES_PER_SECOND))
            for i in range(0, len(data), piece):
                chunk = data[i : i + piece]
                self.queue.append((due, chunk))
                due += len(chunk) / imp.rate
        else:
            self.queue.append((due, data))
        self.free_at = due
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
    def _arm(self) -> None:
        if self.timer is None and self.queue:
            self.timer = call_when_due(self.ctx.loop, self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        t = now()
        while self.queue and self.queue[0][0] <= t and not self.transport.is_closing():
            _, chunk = self.queue.popleft()
            self.queued -= len(chunk)
            self._write(chunk)
        if self.transport.is_closing() or self.finishing:
            return
        self._flow()
        self._arm()
        if (self.eof or self.closing) and not self.queue:
            self.transport.close()

    def _write(self, chunk: bytes) -> None:
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
