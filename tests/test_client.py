"""client: a binary-safe pipe that checks everything came back; one line on errors."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time

import pytest
import trustme
from tools_helpers import Broken, tool


def test_pipe_round_trips_arbitrary_binary(shared_server):
    server = shared_server()
    data = os.urandom(3 << 20) + bytes(range(256))
    result = tool("client", f"127.0.0.1:{server.port}", stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_stdin_from_a_regular_file(shared_server, tmp_path):
    """`socket-echo client HOST < file | cmp - file`: epoll cannot watch a regular file."""
    import subprocess
    import sys

    server = shared_server()
    data = os.urandom(2 << 20)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    with path.open("rb") as stdin:
        result = subprocess.run(
            [sys.executable, "-m", "socket_echo", "client", f"127.0.0.1:{server.port}"],
            stdin=stdin,
            capture_output=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_pipe_over_ipv6_and_empty_input(start_server):
    server = start_server(host="::1")
    result = tool("client", f"[::1]:{server.port}", stdin=b"")
    assert result.returncode == 0 and result.stdout == b""


def test_server_that_loses_bytes_is_exit_1():
    server = Broken("drop")
    try:
        result = tool(
            "client", f"127.0.0.1:{server.port}", "--timeout", "0.5", stdin=os.urandom(10000)
        )
    finally:
        server.close()
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr  # short, or other bytes: either is named
    assert b"came back" in result.stderr or b"the echo differs" in result.stderr


def test_a_trickling_server_meets_a_deadline_not_just_a_silence_timeout():
    """A peer echoing 5 B/s is never silent for --timeout: 2,000 bytes held the client for
    400 s. Each byte is due within the timeout plus its share at ECHO_FLOOR_RATE, so the
    client ends in about a second, naming how much came back and how fast."""
    server = Broken("trickle")
    try:
        started = time.monotonic()
        result = tool("client", f"127.0.0.1:{server.port}", "--timeout", "1",
                      stdin=b"t" * 2000, timeout=30)  # fmt: skip
        took = time.monotonic() - started
    finally:
        server.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "the echo is too slow" in lines[0], lines
    assert "of 2000 bytes back" in lines[0] and "B/s" in lines[0], lines
    assert took < 10, took


def test_connection_refused_is_one_line_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tool("client", f"127.0.0.1:{port}", stdin=b"x")
    assert result.returncode == 2  # unreachable, as for probe and bench
    assert len(result.stderr.strip().splitlines()) == 1
    assert b"refused" in result.stderr.lower()


TOOLS = [("client",), ("probe",), ("probe", "--quick"), ("bench", "-d", "0.2", "-p", "1")]
KINDS = ["tcp", "udp", "tls", "unix", "quic", "dtls"]


@pytest.mark.parametrize(
    ("args", "scheme"),
    [(a, k) for a in TOOLS for k in KINDS if not (a[0] == "bench" and k == "tls")],  # not yet
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_nothing_listening_is_exit_2_for_every_tool_and_kind(args, scheme, tmp_path):
    """The exit-code table (socket_echo/exits.py): the same condition, the same code, one
    line, on every kind (probe quic:// and dtls:// said 1, "1 step(s) failed"; UDP's ICMP
    port unreachable was exit 1 for client and "no datagram was answered" for probe)."""
    kind = socket.SOCK_DGRAM if scheme in ("udp", "quic", "dtls") else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = (
        f"unix://{tmp_path}/nobody.sock" if scheme == "unix" else f"{scheme}://127.0.0.1:{port}"
    )
    timeout = "0.3" if scheme in ("quic", "dtls") else "1"  # no handshake: waits it out
    result = tool(*args, target, "--timeout", timeout, stdin=b"x")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("socket-echo: error: unreachable: "), lines
    if scheme in ("tcp", "tls"):
        assert lines[0].endswith(f"{scheme}://127.0.0.1:{port}: Connection refused"), lines
    if scheme == "udp":
        assert "refused: ICMP port unreachable" in lines[0], lines


def test_udp_pipe():
    server = Broken("udp")
    try:
        data = os.urandom(5000)
        result = tool("client", f"127.0.0.1:{server.port}", "--udp", stdin=data)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


@pytest.fixture
def tls_echo(tmp_path):  # type: ignore[no-untyped-def]
    """A TLS echo server (threads, Python's ssl) with a trustme CA; yields (port, ca_path)."""
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    listener = socket.create_server(("127.0.0.1", 0))

    def handle(raw: socket.socket) -> None:
        with contextlib.suppress(OSError), ctx.wrap_socket(raw, server_side=True) as conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = listener.accept()
                threading.Thread(target=handle, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], str(ca_path)
    listener.close()


def test_tls_client_and_probe_verify_the_certificate(tls_echo):
    port, ca = tls_echo
    data = os.urandom(200_000)
    result = tool("client", f"tls://127.0.0.1:{port}", "--ca", ca, stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    result = tool("probe", f"127.0.0.1:{port}", "--tls", "--ca", ca, "--json")
    assert result.returncode == 0, result.stdout
    # without the CA the certificate is not trusted: one clear line, no traceback
    result = tool("client", f"tls://127.0.0.1:{port}", stdin=b"x")
    assert result.returncode == 2  # no handshake: unreachable
    assert b"certificate" in result.stderr and len(result.stderr.splitlines()) == 1
    result = tool("client", f"tls://127.0.0.1:{port}", "--insecure", stdin=b"insecure ok")
    assert result.returncode == 0 and result.stdout == b"insecure ok"


def test_terminal_line_mode(start_server):
    """On a terminal: lines typed go out, what comes back is printed (a real pty)."""
    import pty
    import subprocess
    import sys
    import time

    server = start_server()
    main, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "socket_echo", "client", f"127.0.0.1:{server.port}"],
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(secondary)
    try:
        os.write(main, b"hello over a terminal\n")
        time.sleep(0.5)
        os.write(main, b"\x04")  # Ctrl-D: end of input
        out, err = proc.communicate(timeout=10)
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"hello over a terminal" in out
    assert b"Connected" in err


def test_client_fails_when_the_echo_differs_from_what_it_sent():
    """A server that swaps bytes sends back as many as it got: counting is not enough, the
    client compares them and names the first byte that differs."""
    from tools_helpers import Broken

    server = Broken("reorder")
    try:
        data = os.urandom(1 << 20)  # many reads: the server swaps two bytes of every 7th
        result = tool("client", f"127.0.0.1:{server.port}", stdin=data)
    finally:
        server.close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "the echo differs from what was sent at byte" in lines[0], lines
