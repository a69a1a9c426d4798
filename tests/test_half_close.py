"""Half-close: the client sends N bytes, shuts down writing, gets exactly N bytes, then EOF."""

from __future__ import annotations

import os
import socket

import pytest
from conftest import recv_until_eof


@pytest.mark.parametrize("size", [0, 1, 4096, 5 << 20])
def test_half_close_gets_everything_then_eof(start_server, server_flags, size):
    server = start_server(*server_flags)
    data = os.urandom(size)
    with server.connect() as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == data
    server.wait_for_log(rf"closed: peer closed; in {size} B, out {size} B")
