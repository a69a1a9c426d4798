"""SIGTERM/SIGINT: stop accepting, drain up to --graceful-timeout, exit 0; 2nd SIGINT: now."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import termios
import time

import pytest
from conftest import exchange, recv_until_eof, wait_until


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_accepting_and_lets_open_connections_finish(start_server, server_flags, sig):
    server = start_server(*server_flags, "--graceful-timeout", "30")
    sock = server.connect()
    assert exchange(sock, b"before") == b"before"
    server.signal(sig)
    server.wait_for_log(r"no longer accepting; draining 1 connection")
    with pytest.raises(OSError):  # the listener is gone
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    data = os.urandom(1 << 20)
    assert exchange(sock, data) == data  # the open one is still served
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    sock.close()
    assert server.wait(10) == 0
    server.wait_for_log(r"stopped: 1 connection\(s\) served \(1 peer closed\)")


def unacked(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer's kernel has not acknowledged yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def test_graceful_timeout_closes_the_rest_without_dropping_received_bytes(
    start_server, server_flags
):
    server = start_server(*server_flags, "--graceful-timeout", "1")
    sock = server.connect()
    data = os.urandom(200_000)
    sock.sendall(data)  # sent before the signal, not read yet
    wait_until(lambda: not unacked(sock), 10, "the server's kernel took every byte")
    server.signal(signal.SIGTERM)
    started = time.monotonic()
    assert recv_until_eof(sock) == data  # every received byte came back, then EOF
    assert server.wait(10) == 0
    assert time.monotonic() - started < 8
    server.wait_for_log(r"closed: shutdown; in 200000 B, out 200000 B")


def test_second_sigint_exits_at_once(start_server, server_flags):
    server = start_server(*server_flags, "--graceful-timeout", "60")
    sock = server.connect()
    assert exchange(sock, b"hold") == b"hold"
    server.signal(signal.SIGINT)
    server.wait_for_log(r"draining 1 connection")
    server.signal(signal.SIGINT)
    started = time.monotonic()
    assert server.wait(5) != 0
    assert time.monotonic() - started < 5
    server.wait_for_log("second interrupt")
    sock.close()


def test_no_connections_exits_at_once_with_zero(start_server):
    server = start_server()
    server.signal(signal.SIGTERM)
    assert server.wait(5) == 0
