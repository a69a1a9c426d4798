"""Over --max-connections new connections are closed at once; everyone else is served."""

from __future__ import annotations

import re

from conftest import exchange, is_closed_by_peer


def test_connections_over_the_limit_are_closed_at_once(start_server, server_flags):
    server = start_server(*server_flags, "--max-connections", "5")
    held = [server.connect() for _ in range(5)]
    for sock in held:  # all five admitted
        assert exchange(sock, b"in") == b"in"
    for _ in range(30):
        try:
            sock = server.connect()
        except ConnectionResetError:
            continue  # refused so fast that connect() itself saw the reset
        assert is_closed_by_peer(sock, timeout=5)
        sock.close()
    for sock in held:
        assert exchange(sock, b"still served") == b"still served"
    m = server.wait_for_log(r"connection limit \(5\) reached: closed (\d+) new connection")
    lines = re.findall(r"connection limit \(5\) reached: closed (\d+)", server.log)
    assert len(lines) <= 3, "the limit is logged at most once a second"
    assert int(m.group(1)) >= 1
    # a slot that frees up is usable again
    held.pop().close()
    for _ in range(50):
        with server.connect() as sock:
            sock.sendall(b"x")
            if sock.recv(1) == b"x":
                break
    else:
        raise AssertionError("a freed slot was never given to a new client")
    for sock in held:
        sock.close()
    # rejected totals are eventually all reported
    server.wait_for_log(r"closed \d+ new connection", timeout=5)
