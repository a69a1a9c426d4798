"""Unix-socket listeners: echo, stale files replaced, live ones refused, removed on exit."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from conftest import assert_one_line_error, exchange, run_cli
from tools_helpers import tool


def unix_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_unix_socket_echo_on_every_engine(start_server, server_flags, tmp_path):
    path = str(tmp_path / "echo.sock")
    server = start_server(*server_flags, "--bind", f"unix://{path}")
    data = os.urandom(1 << 20)
    with unix_connect(path) as sock:
        assert exchange(sock, data) == data
    server.wait_for_log(r"connection #1 from local socket closed: peer closed")
    result = tool("probe", f"unix://{path}", "--json")
    assert result.returncode == 0, result.stdout
    server.signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert not os.path.exists(path), "the socket file is removed on exit"


def test_stale_socket_file_is_replaced(start_server, tmp_path):
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: stale
    assert os.path.exists(path)
    start_server("--bind", f"unix://{path}")
    with unix_connect(path) as sock:
        assert exchange(sock, b"fresh") == b"fresh"


def test_socket_somebody_listens_on_is_an_error(tmp_path):
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen()
    try:
        result = run_cli("--bind", f"unix://{path}")
    finally:
        live.close()
    assert_one_line_error(result, 1, "another server is listening")


def test_path_that_is_not_a_socket_is_an_error(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("keep me")
    assert_one_line_error(run_cli("--bind", f"unix://{path}"), 1, "not a socket")
    assert path.read_text() == "keep me"


def test_relative_unix_path_is_bad_usage():
    assert_one_line_error(run_cli("--bind", "unix://relative"), 2, "absolute")


def test_a_folder_that_refuses_the_socket_is_named_not_ports():
    """The refusal of a folder (read-only, or a filesystem that takes no sockets) is told as
    such; it was told "ports below 1024 need root"."""
    result = run_cli("--bind", "unix:///sys/socket-echo-test.sock")
    if result.returncode == 0:
        pytest.skip("this machine let us make a socket in /sys")
    assert_one_line_error(result, 1, "permission denied: cannot create a socket in /sys")
    assert "ports below 1024" not in result.stderr
