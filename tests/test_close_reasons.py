"""A close's reason is decided by one rule (tcp/lifecycle.lost_reason, and its C twin), so a
log line and ``socket_echo_connections_closed_total{reason}`` say the same on every data path
and over TLS: a peer's reset was "error: [Errno 104] Connection reset by peer" on the
Protocol path (every TLS connection) and "reset by peer" on the others."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest
from conftest import exchange, poll_scrape, total

REASONS = "socket_echo_connections_closed_total"


def connect(server, tls: bool) -> socket.socket:  # type: ignore[no-untyped-def]
    _, _, port = server.listener("tls" if tls else "tcp")
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if not tls:
        return raw
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx.wrap_socket(raw, server_hostname="localhost")


def reset(sock: socket.socket) -> None:
    """Close with RST: SO_LINGER on with 0 s (on the TCP socket under any TLS)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def check_reasons(server, tls: bool) -> None:  # type: ignore[no-untyped-def]
    with connect(server, tls) as sock:  # an orderly close
        assert exchange(sock, b"bye") == b"bye"
    sock = connect(server, tls)
    assert exchange(sock, b"reset me") == b"reset me"
    reset(sock)
    m = poll_scrape(server, lambda m: total(m, REASONS) >= 2)
    assert total(m, REASONS, reason="reset by peer") == 1, m
    assert total(m, REASONS, reason="peer closed") == 1, m
    server.wait_for_log(r"closed: reset by peer; in 8 B")
    assert "Errno" not in server.log


def test_reasons_agree_on_every_tcp_path(start_server, server_flags):
    server = start_server(*server_flags, "--metrics", "127.0.0.1:0")
    check_reasons(server, tls=False)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_reasons_agree_over_tls(start_server, loop):
    server = start_server(
        "--loop", loop, "--bind", "tls://127.0.0.1:0", "--tls-self-signed",
        "--metrics", "127.0.0.1:0",
    )  # fmt: skip
    check_reasons(server, tls=True)
