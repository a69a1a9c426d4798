"""The connection lifecycle, the table's sweep and accept under EMFILE, in-process with a fake
clock: milliseconds of real time for behaviour that takes seconds on a real server. The real
EchoProtocol runs here; its transport is a small recording stand-in (the kernel's side)."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from fake_loop import FakeLoop

from socket_echo.config import ACCEPT_RETRY_DELAY
from socket_echo.lifecycle import IDLE, PEER_CLOSED, SHUTDOWN, STALLED, ListenerContext
from socket_echo.limits import ConnectionTable, sweep_interval
from socket_echo.state import accept_paused_log
from socket_echo.tcp.accept import AcceptReader
from socket_echo.tcp.protocol import EchoProtocol

LISTENER = "tcp://127.0.0.1:4242"


class RecordingTransport:
    """What EchoProtocol asks of a transport: writes are kept (the kernel took ``accepted``
    bytes of them), close flushes, abort drops."""

    def __init__(self, accepted: int | None = None) -> None:
        self.accepted = accepted  # None: the kernel takes everything
        self.buffered = 0
        self.out = b""
        self.closed = self.aborted = self.paused = False
        self.protocol: EchoProtocol | None = None

    def get_extra_info(self, name: str) -> Any:
        return ("192.0.2.7", 5555) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def write(self, data: bytes) -> None:
        take = len(data) if self.accepted is None else min(self.accepted, len(data))
        if self.accepted is not None:
            self.accepted -= take
        self.out += data[:take]
        self.buffered += len(data) - take

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True
        if not self.buffered and self.protocol is not None:
            self.protocol.connection_lost(None)

    def abort(self) -> None:
        self.aborted = True
        if self.protocol is not None:
            self.protocol.connection_lost(None)


def connection(table: ConnectionTable, loop: FakeLoop, accepted: int | None = None):  # type: ignore[no-untyped-def]
    ctx = ListenerContext(table, LISTENER, 1 << 18, False, loop)  # type: ignore[arg-type]
    conn = EchoProtocol(ctx)
    transport = RecordingTransport(accepted)
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_admission_numbers_connections_and_refuses_past_the_cap():
    loop, table = FakeLoop(), ConnectionTable(2, 300.0)
    first, _ = connection(table, loop)
    second, _ = connection(table, loop)
    third, t3 = connection(table, loop)
    assert (first.conn_id, second.conn_id) == (1, 2)
    assert third.conn_id == 0 and t3.aborted  # refused, and never counted in or out
    assert table.rejected.count == 1 and len(table.open) == 2
    assert table.by_listener[LISTENER].opened == 2


def test_draining_listener_admits_nobody():
    loop, table = FakeLoop(), ConnectionTable(10, 300.0)
    ctx = ListenerContext(table, LISTENER, 1024, False, loop)  # type: ignore[arg-type]
    ctx.draining = True
    conn = EchoProtocol(ctx)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    assert transport.aborted and not table.open


def test_descriptor_budget_refuses_before_the_cap():
    loop, table = FakeLoop(), ConnectionTable(100, 300.0, fd_budget=1)
    connection(table, loop)
    _, refused = connection(table, loop)
    assert refused.aborted and table.out_of_descriptors.count == 1


def test_release_counts_bytes_out_as_what_the_kernel_took():
    loop, table = FakeLoop(), ConnectionTable(10, 300.0)
    conn, _ = connection(table, loop, accepted=3)
    conn.data_received(b"hello")
    loop.advance(0.5)
    conn.abort(SHUTDOWN)  # two bytes were still held: lost, and not counted as sent
    counters = table.by_listener[LISTENER]
    assert (counters.bytes_in, counters.bytes_out) == (5, 3)
    assert counters.closed == {SHUTDOWN: 1}
    assert table.durations[3] == 1  # 0.5 s falls in the (0.1, 1] bucket
    assert not table.open


def test_a_close_stamped_by_another_clock_never_lasts_less_than_nothing(caplog):
    """An opening stamped by one clock and a close by another (uvloop's cached time, the
    native engine's) said "-0.000 s" in the close line."""
    loop, table = FakeLoop(), ConnectionTable(10, 300.0)
    ctx = ListenerContext(table, LISTENER, 1 << 18, True, loop)  # type: ignore[arg-type]
    conn = EchoProtocol(ctx)
    transport = RecordingTransport()
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        conn.released(0, now=conn.opened_at - 0.0004)
    line = next(r.getMessage() for r in caplog.records if "closed" in r.getMessage())
    assert line.endswith(", 0.000 s"), line
    assert table.durations[0] == 1


def test_sweep_closes_the_idle_spares_the_busy_and_resets_the_stalled():
    loop, table = FakeLoop(), ConnectionTable(10, 2.0)
    table.start_sweeping(loop)  # type: ignore[arg-type]
    _, idle_t = connection(table, loop)
    busy, _ = connection(table, loop)
    stalled, stalled_t = connection(table, loop, accepted=0)
    stalled.data_received(b"never read")  # held: its peer does not read
    for _ in range(10):  # 2.5 s: busy talks every 250 ms
        loop.advance(0.25)
        busy.data_received(b"tick")
    assert idle_t.closed and not idle_t.aborted
    assert stalled_t.aborted
    assert busy in table.open
    closed = table.by_listener[LISTENER].closed
    assert closed == {IDLE: 1, STALLED: 1}


def test_a_closing_connection_whose_peer_neither_reads_nor_closes_is_reset_later():
    loop, table = FakeLoop(), ConnectionTable(10, 1.0)
    table.start_sweeping(loop)  # type: ignore[arg-type]
    conn, transport = connection(table, loop)
    transport.protocol = None  # the FIN goes out, but the peer never closes its side
    loop.advance(1.2)
    assert transport.closed and not transport.aborted and conn in table.open
    transport.protocol = conn
    loop.advance(0.7)
    assert not transport.aborted  # a whole timeout more to close its side
    loop.advance(0.5)
    assert transport.aborted
    assert table.by_listener[LISTENER].closed == {IDLE: 1}  # the first reason stays


def test_idle_timeout_zero_never_sweeps():
    loop, table = FakeLoop(), ConnectionTable(10, 0.0)
    table.start_sweeping(loop)  # type: ignore[arg-type]
    _, transport = connection(table, loop)
    assert loop.pending() == []  # no sweep at all: 0 means never, not "at once"
    loop.advance(10_000.0)
    assert not transport.closed


def test_half_close_delivers_then_counts_peer_closed():
    loop, table = FakeLoop(), ConnectionTable(10, 300.0)
    conn, transport = connection(table, loop)
    conn.data_received(b"abc")
    assert conn.eof_received() is True  # keep the transport: the echo may still be owed
    assert transport.closed and transport.out == b"abc"
    assert table.by_listener[LISTENER].closed == {PEER_CLOSED: 1}


def test_sweep_interval_bounds():
    assert sweep_interval(300) == 1.0 and sweep_interval(0.1) == 0.05 and sweep_interval(2) == 0.25


class FlakyListener:
    """A listening socket whose accept() meets EMFILE ``failures`` times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.accepted = 0
        self.waiting = 3  # clients in the backlog

    def fileno(self) -> int:
        return 99

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        if not self.waiting:
            raise BlockingIOError
        self.waiting -= 1
        self.accepted += 1
        a, b = socket.socketpair()
        b.close()
        return a, ("192.0.2.1", 1000 + self.accepted)


def test_accept_pauses_on_emfile_and_resumes_after_the_delay():
    loop, listener = FakeLoop(), FlakyListener(failures=1)
    log = accept_paused_log()
    got: list[socket.socket] = []
    reader = AcceptReader(loop, listener, None, log, on_accept=got.append)  # type: ignore[arg-type]
    reader.start()
    loop.readers[99]()  # readable: accept meets EMFILE
    assert 99 not in loop.readers and reader.paused and log.count == 1
    loop.advance(ACCEPT_RETRY_DELAY * 0.9)
    assert 99 not in loop.readers  # still waiting: no busy loop on EMFILE
    loop.advance(ACCEPT_RETRY_DELAY * 0.2)
    assert 99 in loop.readers and not reader.paused
    loop.readers[99]()
    assert listener.accepted == 3 and len(got) == 3  # the backlog is served
    for sock in got:
        sock.close()


def test_accept_resumes_at_once_when_a_connection_closes():
    loop, listener = FakeLoop(), FlakyListener(failures=1)
    reader = AcceptReader(loop, listener, None, accept_paused_log(), on_accept=lambda s: s.close())  # type: ignore[arg-type]
    reader.start()
    loop.readers[99]()
    assert reader.paused
    reader.resume_if_paused()  # what the table's on_close does
    assert 99 in loop.readers and not reader.paused
    assert loop.pending() == []  # the retry timer was cancelled
