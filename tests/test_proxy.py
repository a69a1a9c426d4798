"""PROXY protocol: the sans-IO parser (property tests) and tcp+proxy:// listeners."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import exchange, is_closed_by_peer, poll_scrape, total
from hypothesis import given, settings
from hypothesis import strategies as st

from socket_echo.gates.proxy import (
    V1_MAX,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    parse,
)

addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def valid_headers(draw):  # type: ignore[no-untyped-def]
    v6 = draw(st.booleans())
    addr = addresses6 if v6 else addresses4
    src, dst = (draw(addr), draw(ports)), (draw(addr), draw(ports))
    if draw(st.booleans()):
        return build_v1(src, dst), src
    if draw(st.booleans()):
        return build_v2(None, tlvs=draw(st.binary(max_size=64))), None
    return build_v2(src, dst, tlvs=draw(st.binary(max_size=64))), src


def outcome(data: bytes) -> ProxyHeader | str | None:
    try:
        return parse(data)
    except ProxyHeaderError as exc:
        return f"error: {exc}"


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_none_or_our_error_only(data):
    result = outcome(data)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)


@given(valid_headers(), st.binary(max_size=100))
def test_valid_headers_parse_and_never_read_past_the_header(header_and_src, payload):
    header, src = header_and_src
    result = parse(header + payload)
    assert isinstance(result, ProxyHeader)
    assert result.length == len(header)
    if src is not None:
        assert result.source is not None
        assert result.source[1] == src[1]
        assert socket.inet_pton(
            socket.AF_INET6 if ":" in src[0] else socket.AF_INET, result.source[0]
        ) == socket.inet_pton(socket.AF_INET6 if ":" in src[0] else socket.AF_INET, src[0])


@given(valid_headers())
def test_truncated_headers_ask_for_more_never_fail(header_and_src):
    header, _ = header_and_src
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


@settings(max_examples=300)
@given(valid_headers(), st.data())
def test_mutated_headers_never_raise_anything_else(header_and_src, data):
    header, _ = header_and_src
    buf = bytearray(header)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    result = outcome(bytes(buf))
    if isinstance(result, ProxyHeader):
        assert result.length <= len(buf)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "expected"),
        (b"PROXY TCP4 1.2.3.999 5.6.7.8 80 90\r\n", "bad address"),
        (b"PROXY TCP4 ::1 5.6.7.8 80 90\r\n", "not IPv4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 90\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 70000\r\n", "out of range"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 90\n", "CRLF"),
        (b"PROXY " + b"x" * V1_MAX, "longer than"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12), "version"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4), "shorter"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", "limit"),
    ],
)
def test_malformed_headers_are_named(data, words):
    with pytest.raises(ProxyHeaderError, match=words):
        parse(data)


def test_unknown_and_local_keep_the_real_address():
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, None, None, 15)
    local = build_v2(None)
    assert parse(local) == ProxyHeader(2, None, None, len(local))


# -- over real sockets ---------------------------------------------------------------------


def test_v1_and_v2_clients_are_logged_with_their_real_address(start_server):
    server = start_server(
        "--bind", "tcp+proxy://127.0.0.1:0", "--bind", "tcp://127.0.0.1:0", expect_listeners=2
    )
    _, host, port = server.listener("tcp+proxy")
    for header, shown in (
        (build_v1(("203.0.113.7", 5555), ("192.0.2.1", 4242)), "203.0.113.7:5555"),
        (build_v2(("2001:db8::7", 6666), ("2001:db8::1", 4242)), r"\[2001:db8::7\]:6666"),
    ):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(header + b"first bytes")  # payload in the same segment as the header
            assert sock.recv(100) == b"first bytes"
            assert exchange(sock, b"then more") == b"then more"
        server.wait_for_log(rf"connection #\d+ from {shown} closed: peer closed")
    plain = server.listener("tcp")  # a plain listener at the same time
    with socket.create_connection((plain[1], plain[2]), timeout=10) as sock:
        assert exchange(sock, b"PROXY is just data here") == b"PROXY is just data here"


def test_bad_missing_or_oversized_headers_close_the_connection(start_server):
    server = start_server("--bind", "tcp+proxy://127.0.0.1:0", "--metrics", "127.0.0.1:0")
    _, host, port = server.listener("tcp+proxy")
    for junk in (b"hello world\r\n", b"PROXY TCP4 1.2.3.4\r\n", b"PROXY " + b"9" * 200):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(junk)
            assert is_closed_by_peer(sock, timeout=5)
    m = poll_scrape(server, lambda m: total(m, "socket_echo_proxy_rejected_total") >= 3)
    assert total(m, "socket_echo_proxy_rejected_total") == 3
    server.wait_for_log(r"PROXY header from .* rejected: (no PROXY protocol header|v1 header)")


def test_rejections_are_logged_at_most_once_a_second():
    """2,000 bad headers were 2,000 log lines: now a line a second, saying how many more."""
    from socket_echo.state import ProxyStats

    now = [100.0]
    stats = ProxyStats(clock=lambda: now[0])
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("socket_echo")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for i in range(2000):
            now[0] += 0.001  # 2,000 in 2 s
            stats.reject("tcp+proxy://x:1", True, f"192.0.2.{i % 250}:1", "malformed", "bad v1")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    rejected = [line for line in lines if "rejected" in line]
    assert sum(stats.rejected.values()) == 2000
    assert 2 <= len(rejected) <= 3, rejected
    assert "(999 more rejected since the last line)" in rejected[1], rejected


def test_header_must_arrive_in_time(start_server):
    server = start_server("--bind", "tcp+proxy://127.0.0.1:0", "--proxy-header-timeout", "0.5")
    _, host, port = server.listener("tcp+proxy")
    with socket.create_connection((host, port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"PROXY TCP4 ")  # a start, never finished
        assert is_closed_by_peer(sock, timeout=10)
        assert 0.4 < time.monotonic() - started < 4
    server.wait_for_log(r"rejected: no PROXY header within 0\.5 s")


def test_atheris_fuzz_target_runs_clean(tmp_path):
    """The libFuzzer target `make fuzz` runs for long, here for a few thousand inputs."""
    pytest.importorskip("atheris")
    target = Path(__file__).resolve().parent / "fuzz_proxy.py"
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(target), "--write-seeds", str(corpus)], check=True)
    result = subprocess.run(
        [sys.executable, str(target), str(corpus), "-runs=20000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done 20000 runs" in result.stderr
