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


def test_idle_timeout_zero_never_closes(start_server):
    server = start_server("--idle-timeout", "0")
    with server.connect() as sock:
        time.sleep(1.5)
        sock.sendall(b"later")
        assert sock.recv(10) == b"later"
