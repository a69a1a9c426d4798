"""The native engine's thread against Python's view of its connections, in process and over
real sockets: the engine closes connections on its own thread while Python still holds their
objects, and reuses their descriptor numbers at once. Each test sets up one such interleaving
on purpose (the engine is seen to have closed a connection before Python has heard of it) and
checks that nothing is counted twice, lost, or done to the wrong connection."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import NATIVE, exchange, refused_answer

from socket_echo.lifecycle import ListenerContext
from socket_echo.limits import ConnectionTable
from socket_echo.logs import RateLimitedLog

pytestmark = [
    pytest.mark.skipif(not NATIVE, reason="the native extension is not built"),
    pytest.mark.native,  # the sanitizer gates run these
]


LISTENER = "tcp://test"


class Rig:
    """One engine on a fresh event loop, one loopback listener, the table it admits against."""

    def __init__(
        self, max_connections: int = 100, access_log: bool = False, idle_timeout: float = 60
    ) -> None:
        from socket_echo.tcp.native import NativeEngine

        self.loop = asyncio.new_event_loop()
        self.table = ConnectionTable(max_connections, idle_timeout=idle_timeout)
        self.engine = NativeEngine(
            self.loop,
            65536,
            RateLimitedLog("descriptors_exhausted", "{count}"),
            self.table,
            want_peers=access_log,
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        ctx = ListenerContext(self.table, LISTENER, 65536, access_log, self.loop)
        self.engine.add_listener(self.listener, ctx)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        assert exchange(sock, b"hello") == b"hello"  # accepted and served by the thread
        return sock

    def closed_unheard(self) -> Any:
        """A listed connection whose peer closed and which the engine has closed (its count
        dropped) while Python has not heard yet: the loop does not run meanwhile."""
        sock = self.connect()
        self.table.list_all()
        (conn,) = self.table.open
        sock.close()
        deadline = time.monotonic() + 5
        while self.table.count():  # the engine gave its slot back; the loop has not run
            assert time.monotonic() < deadline
        return conn

    def until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll the engine (and let the loop hear it) until ``condition`` holds."""
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline, what
            self.loop.run_until_complete(asyncio.sleep(0.002))

    def closed(self, reason: str) -> int:
        return self.table.by_listener[LISTENER].closed[reason] if self.table.by_listener else 0

    def close(self) -> None:
        self.engine.shutdown()
        self.listener.close()
        self.loop.close()


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**kwargs: object) -> Rig:
        made.append(Rig(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_an_abort_of_a_connection_the_engine_closed_already_is_counted_once(rig):
    r = rig()
    conn = r.closed_unheard()
    conn.abort("shutdown")  # the drain's reset, racing the peer's own close
    r.until(lambda: not r.table.count() and not r.table.open, "the close event releases it")
    assert r.closed("shutdown") == 1  # the reason given first, counted once
    assert sum(r.table.by_listener[LISTENER].closed.values()) == 1
    assert r.table.opened == 1


def test_a_stale_close_never_reaches_the_new_tenant_of_a_descriptor(rig):
    r = rig()
    old = r.closed_unheard()
    second = r.connect()  # the lowest free number: the one the engine just closed
    assert r.table.count() == 1
    old.close("idle timeout")  # Python's object still names the old connection
    old.abort("idle timeout")
    assert exchange(second, b"still mine") == b"still mine"
    r.until(lambda: r.closed("idle timeout") == 1, "the old connection is counted out")
    r.table.list_all()
    assert len(r.table.open) == 1 and old not in r.table.open
    assert exchange(second, b"and again") == b"and again"
    second.close()


def test_admission_counts_the_tables_other_connections(rig):
    r = rig(max_connections=2)

    class Other:  # a connection of another listener (TLS, PROXY: the pure paths)
        active_since = 0.0
        engine_owned = False

    other = Other()
    assert r.table.admit(other, 0.0, "tls://other")  # type: ignore[arg-type]
    held = r.connect()
    assert refused_answer(r.port) == b""  # reset, never echoed: the other one counts
    r.until(lambda: r.table.rejected.count >= 1, "the refusal is told to Python")
    r.table.release(other, "peer closed", 0, 0, "tls://other")  # type: ignore[arg-type]
    assert exchange(r.connect(), b"room") == b"room"
    held.close()


def test_openings_are_told_at_once_with_their_peer_when_each_is_logged(rig):
    r = rig(access_log=True)
    sock = r.connect()
    r.until(lambda: len(r.table.open) == 1, "the opening is heard without a listing")
    (conn,) = r.table.open
    assert conn.peer == sock.getsockname()
    sock.close()
    r.until(lambda: not r.table.open, "and its close")
    assert r.closed("peer closed") == 1


def test_unlisted_closes_are_told_within_the_flush_time_without_a_listing(rig):
    r = rig()
    for _ in range(3):
        with r.connect():
            pass
    # no sweep, scrape or drain lists anything here: only the engine's own telling can
    r.until(lambda: r.table.opened == 3, "the sums reach Python with no listing")
    counters = r.table.by_listener[LISTENER]
    assert counters.closed["peer closed"] == 3
    assert counters.bytes_in == counters.bytes_out == 3 * len(b"hello")
    assert not r.table.open and not r.table.count()


def test_a_scrape_counts_unlisted_connections_from_the_engine_and_leaves_them_unlisted(rig):
    from socket_echo.metrics import ServerCollector
    from socket_echo.state import ServerState

    r = rig()
    socks = [r.connect() for _ in range(4)]  # 5 bytes echoed on each
    closed = r.connect()
    closed.close()
    r.until(lambda: r.table.opened == 1, "the closed one is told as a sum")
    families = {m.name: m for m in ServerCollector(ServerState(r.table)).collect()}
    assert r.table.count() == 4 and not r.table.open  # no object was made for any

    def value(family: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name.endswith("_total") or s.name == family
            if all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("socket_echo_connections_opened", listener=LISTENER) == 5
    assert value("socket_echo_connections_active") == 4
    assert value("socket_echo_bytes", listener=LISTENER, direction="in") == 5 * 5
    assert value("socket_echo_bytes", listener=LISTENER, direction="out") == 5 * 5
    for sock in socks:
        sock.close()


def test_the_engine_and_the_python_paths_take_from_one_count(rig):
    """The cap is one number: a Python path's admission sees the engine's connections at
    once (nothing is told between them), and the engine sees the Python path's."""
    r = rig(max_connections=2)

    class Other:
        active_since = 0.0
        engine_owned = False

    held = [r.connect(), r.connect()]  # the engine took both slots in its thread
    assert r.table.count() == 2
    assert not r.table.admit(Other(), 0.0, "tls://other")  # type: ignore[arg-type]
    assert r.table.rejected.count >= 1
    held.pop().close()
    r.until(lambda: r.table.count() == 1, "the engine gives the slot back as it closes")
    other = Other()
    assert r.table.admit(other, 0.0, "tls://other")  # type: ignore[arg-type]
    assert refused_answer(r.port) == b""  # and now the engine is full
    r.table.release(other, "peer closed", 0, 0, "tls://other")  # type: ignore[arg-type]
    assert r.table.count() == 1
    held.pop().close()


@pytest.mark.parametrize("twin", ["native", "python"])
def test_the_count_refuses_by_the_same_rule_in_c_and_python(twin):
    """se_count_take and limits.OpenCount: the cap first, then the descriptor budget."""
    from socket_echo.limits import ADMITTED, OVER_BUDGET, OVER_CAP, OpenCount
    from socket_echo.tcp import _native

    count = _native.Count() if twin == "native" else OpenCount()
    assert [count.take(3, 10) for _ in range(4)] == [ADMITTED] * 3 + [OVER_CAP]
    assert count.take(10, 3) == OVER_BUDGET and count.value() == 3
    count.give()
    assert count.take(3, 10) == ADMITTED and count.value() == 3
    assert (_native.ADMITTED, _native.OVER_CAP, _native.OVER_BUDGET) == (
        ADMITTED,
        OVER_CAP,
        OVER_BUDGET,
    )


def test_the_engine_sweeps_its_own_connections_on_the_clock_it_is_given(rig):
    """engine.c's sweep is limits.ConnectionTable.sweep's rule: no activity for the idle
    timeout closes (FIN: the peer reads EOF), counted as idle; a connection that still
    moves is left alone. Driven with a clock of the test's (the thread's own sweep is every
    second against a 60 s timeout here: it never fires)."""
    r = rig()
    quiet, busy = r.connect(), r.connect()
    now = time.monotonic()
    r.engine.core.sweep(now + 30)  # the first look: both moved since they opened
    assert exchange(busy, b"more") == b"more"
    r.engine.core.sweep(now + 59)
    r.engine.core.sweep(now + 95)  # quiet: nothing for 65 s; busy: moved at +59
    quiet.settimeout(5)
    assert quiet.recv(10) == b""  # FIN from the engine
    assert exchange(busy, b"still") == b"still"
    quiet.close()
    r.until(lambda: r.closed("idle timeout") == 1, "the idle close is counted as idle")
    assert r.table.count() == 1 and r.closed("peer closed") == 0
    busy.close()


def test_the_engine_resets_a_connection_whose_echo_cannot_drain(rig):
    """A peer that sends and never reads: its echo is held, nothing moves, and the sweep
    resets it (write stalled) rather than waiting for a FIN it could never deliver."""
    r = rig()
    sock = socket.create_connection(("127.0.0.1", r.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    r.until(lambda: r.table.count() == 1, "the engine accepts it")
    r.table.list_all()
    (conn,) = r.table.open
    chunk = b"x" * 65536
    deadline = time.monotonic() + 10
    while not conn.held():  # until the engine holds an echo the peer does not take
        assert time.monotonic() < deadline, "the engine never held an echo"
        with contextlib.suppress(BlockingIOError):
            sock.send(chunk)
        select.select([], [sock], [], 0.01)
    now = time.monotonic()
    r.engine.core.sweep(now + 1)
    r.engine.core.sweep(now + 62)
    sock.setblocking(True)
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while sock.recv(1 << 20):
            pass
    sock.close()
    r.until(lambda: r.closed("write stalled") == 1, "the reset is counted as stalled")
    assert r.table.count() == 0
