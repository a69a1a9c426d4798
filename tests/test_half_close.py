"""Half-close: the client sends N bytes, shuts down writing, gets exactly N bytes, then EOF."""

from __future__ import annotations

import os
import socket

from conftest import recv_until_eof


def test_half_close_gets_everything_then_eof(start_server, server_flags):
    """Each size on its own connection to one server per data path (each close line is the
    size's own: the sizes differ)."""
    server = start_server(*server_flags)
    for size in (0, 1, 4096, 5 << 20):
        data = os.urandom(size)
        with server.connect() as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == data, size
        server.wait_for_log(rf"closed: peer closed; in {size} B, out {size} B")
