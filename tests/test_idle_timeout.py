"""The idle timeout closes idle connections and only those (a periodic sweep)."""

from __future__ import annotations

import time

from conftest import is_closed_by_peer


def test_idle_connection_is_closed_and_busy_one_is_not(start_server, server_flags):
    server = start_server(*server_flags, "--idle-timeout", "0.5")
    idle = server.connect()
    busy = server.connect()
    started = time.monotonic()
    while time.monotonic() - started < 1.2:  # busy talks every 100 ms, idle says nothing
        busy.sendall(b"tick")
        assert busy.recv(10) == b"tick"
        time.sleep(0.1)
    assert is_closed_by_peer(idle, timeout=0.5)
    busy.sendall(b"alive")
    assert busy.recv(10) == b"alive"
    server.wait_for_log(r"connection #1 from .* closed: idle timeout")
    idle.close()
    busy.close()


def test_idle_timeout_zero_never_closes():
    """0 means never: the table's sweep closes nothing however long a connection is quiet
    (a fake clock, a day on; the real-socket sleep this replaced would also have passed had
    0 fallen back to the 300 s default)."""
    from socket_echo.limits import ConnectionTable

    class Quiet:
        listener, seen_activity, active_since, closed = "tcp://x", 0, 0.0, False
        engine_owned = False

        def activity(self) -> int:
            return 0

        def received(self) -> int:
            return 0

        def held(self) -> int:
            return 0

        def idle_expired(self) -> None:
            self.closed = True

        def close(self, reason: str) -> None: ...

        def abort(self, reason: str) -> None: ...

    for timeout, closes in ((0.0, False), (300.0, True)):
        table = ConnectionTable(10, timeout)
        conn = Quiet()
        assert table.admit(conn, 0.0, conn.listener)  # type: ignore[arg-type]
        for now in (1.0, 301.0, 86400.0):
            table.sweep(now)
        assert conn.closed is closes, timeout
