"""The native path without per-connection log lines (--no-access-log): it admits in C and
makes a connection's Python object only when the table lists everything (the sweep, the
drain, a scrape), so a connection that comes and goes in between costs Python one call. The
limits, counters, sweep and drain must hold exactly as when every connection has an object."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import NATIVE, exchange, metrics_port, refused_answer, scrape, total

pytestmark = [
    pytest.mark.skipif(not NATIVE, reason="the native extension is not built"),
    pytest.mark.native,  # the sanitizer gates run these
]


def unlisted_server(start_server, *args: str):  # type: ignore[no-untyped-def]
    return start_server(
        "--engine", "native", "--no-access-log", "--metrics", "127.0.0.1:0", *args
    )  # fmt: skip


def echo_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return exchange(sock, payload)


def test_churned_connections_are_counted_as_if_each_had_an_object(start_server):
    server = unlisted_server(start_server)
    _, _, port = server.listener()
    for i in range(200):
        assert echo_once(port, b"%03d" % i + b"x" * 97) == b"%03d" % i + b"x" * 97
    m = scrape(metrics_port(server))
    deadline = time.monotonic() + 5  # the last closes may still be on their way
    while total(m, "socket_echo_connections_closed_total") < 200 and time.monotonic() < deadline:
        m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_opened_total") == 200
    assert total(m, "socket_echo_connections_closed_total", reason="peer closed") == 200
    assert total(m, "socket_echo_bytes_total", direction="in") == 200 * 100
    assert total(m, "socket_echo_bytes_total", direction="out") == 200 * 100
    assert total(m, "socket_echo_connection_duration_seconds_count") == 200
    assert total(m, "socket_echo_connections_active") == 0


def test_the_cap_is_held_in_c_and_counted(start_server):
    server = unlisted_server(start_server, "--max-connections", "3")
    _, _, port = server.listener()
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    for sock in held:
        sock.sendall(b"in")
        assert sock.recv(10) == b"in"
    assert refused_answer(port) == b""  # the fourth is reset, never echoed
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_rejected_total", reason="max_connections") >= 1
    assert total(m, "socket_echo_connections_active") == 3
    held.pop().close()
    deadline = time.monotonic() + 5
    while total(scrape(metrics_port(server)), "socket_echo_connections_active") > 2:
        assert time.monotonic() < deadline
    assert echo_once(port, b"room again") == b"room again"
    for sock in held:
        sock.close()


def test_the_sweep_lists_and_closes_idle_connections(start_server):
    server = unlisted_server(start_server, "--idle-timeout", "1")
    _, _, port = server.listener()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert exchange(sock, b"then nothing") == b"then nothing"
        sock.settimeout(5)
        assert sock.recv(100) == b""  # FIN from the sweep
    deadline = time.monotonic() + 5  # counted once the server has seen our close
    while not total(m := scrape(metrics_port(server)), "socket_echo_connections_closed_total"):
        assert time.monotonic() < deadline
    assert total(m, "socket_echo_connections_closed_total", reason="idle timeout") == 1


def test_the_drain_lists_open_connections_and_closes_them_after_the_grace(start_server):
    server = unlisted_server(start_server, "--graceful-timeout", "0.5")
    _, _, port = server.listener()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert exchange(sock, b"open at SIGTERM") == b"open at SIGTERM"
        server.signal(signal.SIGTERM)
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed after the grace, not reset
    assert server.wait(10) == 0
    server.wait_for_log(r"stopped: 1 connection\(s\) served \(1 shutdown\)")
