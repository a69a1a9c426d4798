"""Listener impairments (?delay=, jitter, rate, reset-after, close-after; UDP drop, duplicate):
parsed strictly, applied on real sockets, counted in /metrics, and seen by probe."""

from __future__ import annotations

import contextlib
import json
import math
import select
import socket
import threading
import time

import psutil
import pytest
from conftest import (
    assert_one_line_error,
    exchange,
    metrics_port,
    poll_scrape,
    recv_exactly,
    run_cli,
    scrape,
    total,
    wait_until,
)
from tools_helpers import tool

from socket_echo.binds import parse_bind_url
from socket_echo.config import ConfigError
from socket_echo.impair.params import Impairments


def impaired(start_server, query: str, *args: str, scheme: str = "tcp"):  # type: ignore[no-untyped-def]
    server = start_server(
        "--bind", f"{scheme}://127.0.0.1:0?{query}", "--metrics", "127.0.0.1:0", *args
    )
    _, host, port = server.listener(scheme)
    return server, host, port


# -- parsing ----------------------------------------------------------------------------------


def test_units_and_what_the_log_says():
    spec = parse_bind_url("tcp://0.0.0.0:4243?delay=80ms&jitter=20ms&rate=1MiB&seed=3")
    assert spec.impair == Impairments(delay=0.08, jitter=0.02, rate=1048576.0, seed=3)
    assert spec.port == 4243 and spec.url == "tcp://0.0.0.0:4243"
    assert (
        spec.impair.describe() == "delay 80 ms + jitter up to 20 ms, rate 1.04858e+06 B/s, seed 3"
    )
    assert parse_bind_url("tcp://h:1?reset-after=64KiB").impair.reset_after == 65536
    assert parse_bind_url("tcp://h:1?close-after=2kB").impair.close_after == 2000
    assert parse_bind_url("udp://h:1?drop=2.5%25&duplicate=10").impair == Impairments(
        drop=0.025, duplicate=0.1
    )
    assert parse_bind_url("tcp://h:1").impair is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("tcp://h:1?delay=fast", "delay='fast': not a duration"),
        ("tcp://h:1?delay=2min", "not a duration"),
        ("tcp://h:1?delay=90s", "at most 60 s"),
        ("tcp://h:1?drop=5", "unknown impairment 'drop' for a stream listener"),
        ("udp://h:1?reset-after=10", "unknown impairment 'reset-after' for a datagram listener"),
        ("udp://h:1?drop=101", "drop='101': out of range (0-100)"),
        ("tcp://h:1?rate=0", "must be at least 1 byte"),
        ("tcp://h:1?reset-after=1&close-after=2", "exclude each other"),
        ("tcp://h:1?delay=1ms&delay=2ms", "given twice"),
        ("tcp://h:1?seed=x", "not an integer"),
        ("tcp://h:1?delay", "malformed query"),
    ],
)
def test_bad_parameters_are_named(url, words):
    with pytest.raises(ConfigError, match=None) as exc:
        parse_bind_url(url)
    assert words in str(exc.value)


def test_bad_parameter_on_the_command_line_is_one_line_exit_2():
    result = run_cli("serve", "--bind", "tcp://127.0.0.1:0?jitter=lots")
    assert_one_line_error(result, 2, "jitter='lots'")


# -- streams ----------------------------------------------------------------------------------


def timed_round_trip(sock: socket.socket) -> float:
    started = time.monotonic()
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    return time.monotonic() - started


def test_impaired_listener_beside_a_clean_one(start_server):
    server = start_server(
        "--bind",
        "tcp://127.0.0.1:0",
        "--bind",
        "tcp://127.0.0.1:0?delay=50ms",
        expect_listeners=2,
    )
    server.wait_for_log(r"listening on tcp://127\.0\.0\.1:\d+ \(.*; (native|epoll) path\)$")
    server.wait_for_log(r"; impaired path\); impairments: delay 50 ms$")
    (_, _, clean), (_, _, slow) = sorted(
        server.listeners_of("tcp"), key=lambda entry: "impaired" in server.log_line_of(entry[2])
    )
    for port, low, high in ((clean, 0.0, 0.045), (slow, 0.05, 5.0)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            fastest = min(timed_round_trip(sock) for _ in range(5))
        assert low <= fastest < high, (port, fastest)  # the delay is this listener's alone


def test_delay_is_added_to_every_echo(start_server, loop_name):
    server, host, port = impaired(start_server, "delay=100ms", "--loop", loop_name)
    with socket.create_connection((host, port), timeout=5) as sock:
        for _ in range(3):
            started = time.monotonic()
            assert exchange(sock, b"ping") == b"ping"
            assert 0.095 <= time.monotonic() - started < 0.6
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_impairments_total", kind="delayed") >= 3


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_a_delay_is_a_lower_bound_never_early(start_server, loop_name, scheme):
    """As netem's: the fastest of many round trips is never under the delay asked for (libuv's
    timers are whole milliseconds from a cached loop time; uvloop's came back 0.7 ms early)."""
    delay = 0.005
    _, host, port = impaired(start_server, "delay=5ms", "--loop", loop_name, scheme=scheme)
    kind = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
    fastest = math.inf
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(5)
        sock.connect((host, port))
        for i in range(150):
            payload = i.to_bytes(4, "big")
            started = time.perf_counter()
            sock.send(payload)
            assert recv_exactly(sock, 4) == payload
            fastest = min(fastest, time.perf_counter() - started)
    assert fastest >= delay, f"{fastest * 1e3:.3f} ms < {delay * 1e3:g} ms"


def test_a_mebibyte_through_jitter_comes_back_exact_and_in_order(start_server, loop_name):
    _server, host, port = impaired(start_server, "delay=1ms&jitter=5ms&seed=1", "--loop", loop_name)
    data = bytes(range(256)) * 4096
    with socket.create_connection((host, port), timeout=10) as sock:
        assert exchange(sock, data, chunk=7919) == data


def test_rate_limits_the_echo_bandwidth(start_server):
    _server, host, port = impaired(start_server, "rate=200KiB")
    data = b"r" * (100 << 10)
    with socket.create_connection((host, port), timeout=10) as sock:
        started = time.monotonic()
        assert exchange(sock, data) == data
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, elapsed  # 100 KiB at 200 KiB/s: half a second


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_reset_after_exactly_n_bytes_never_a_clean_eof(start_server, loop):
    server, host, port = impaired(start_server, "reset-after=1000", "--loop", loop)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"x" * 5000)
        got = b""
        with pytest.raises(ConnectionResetError):
            while True:
                part = sock.recv(65536)
                assert part, f"a clean EOF after {len(got)} bytes, not a reset"
                got += part
    assert got == b"x" * 1000
    server.wait_for_log(r"closed: reset-after; in 5000 B, out 1000 B")
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_impairments_total", kind="reset") == 1
    assert total(m, "socket_echo_connections_closed_total", reason="reset-after") == 1


def test_close_after_n_bytes_is_a_fin(start_server):
    _server, host, port = impaired(start_server, "close-after=1000")
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"y" * 3000)
        got = recv_exactly(sock, 5000)  # stops at EOF
    assert got == b"y" * 1000


def test_long_delay_and_a_fast_sender_stay_within_max_buffer(start_server):
    server, host, port = impaired(start_server, "delay=5s", "--max-buffer", "256KiB")
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    sent = [0]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)

        def blast() -> None:
            chunk = b"z" * 65536
            try:
                while sent[0] < 256 << 20:
                    sent[0] += sock.send(chunk)
            except OSError:
                pass

        threading.Thread(target=blast, daemon=True).start()
        last, still = -1, time.monotonic()
        while time.monotonic() - still < 1.0:  # until the sender is blocked
            if sent[0] != last:
                last, still = sent[0], time.monotonic()
            time.sleep(0.05)
        growth = proc.memory_info().rss - before
        assert sent[0] < 64 << 20, "the server kept reading although its echo waited"
        assert growth < 16 << 20, f"RSS grew {growth >> 20} MiB"


def blocked_senders(host: str, port: int, count: int, piece: int) -> list[socket.socket]:
    """``count`` connections that send ``piece``-byte writes without reading, returned once
    every one is blocked (the server stopped reading from it)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 12)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 12)
        sock.setblocking(False)
        socks.append(sock)
    data = b"r" * piece

    def all_blocked() -> bool:  # each filled until it takes nothing, none writable for 0.3 s
        for sock in socks:
            with contextlib.suppress(BlockingIOError):
                while sock.send(data):
                    pass
        return not select.select([], socks, [], 0.3)[1]

    wait_until(all_blocked, 30, "every sender blocked", every=0)
    return socks


@pytest.mark.parametrize("query", ["rate=1", "delay=2s&jitter=1s&rate=10"])
def test_memory_is_bounded_by_what_is_held_whatever_the_rate(start_server, query):
    """?rate=1 cut what arrived into one queue entry per byte: ~46 MiB per connection for the
    256 KiB it may hold. Now a connection costs what it holds plus a constant."""
    server, host, port = impaired(start_server, query, "--max-buffer", "256KiB")
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    socks = blocked_senders(host, port, count=4, piece=4096)
    try:
        growth = proc.memory_info().rss - before
        # 4 x 256 KiB held, a bytearray's slack each, the kernel's buffers are not ours:
        # 24 MiB is generous (the per-byte queue took ~180 MiB here)
        assert growth < 24 << 20, f"RSS grew {growth / 2**20:.0f} MiB for 4 connections"
    finally:
        for sock in socks:
            sock.close()


def test_probe_reports_the_delay_and_fails_on_a_reset(start_server):
    _, _, slow = impaired(start_server, "delay=5ms")
    result = tool("probe", f"127.0.0.1:{slow}", "--json", "--timeout", "2")
    report = json.loads(result.stdout)
    latency = next(s for s in report["steps"] if s["name"].startswith("latency"))
    assert latency["status"] == "pass" and latency["p50_us"] >= 5_000
    _, _, cut = impaired(start_server, "reset-after=20000")
    result = tool("probe", f"127.0.0.1:{cut}", "--json", "--timeout", "2")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    failed = [s for s in report["steps"] if s["status"] == "fail"]
    assert any("reset" in s["detail"].lower() for s in failed), failed


# -- datagrams --------------------------------------------------------------------------------


def udp_exchange(host: str, port: int, count: int, burst: int = 50) -> list[bytes]:
    """Send ``count`` numbered datagrams in bursts (each burst's answers read before the next,
    so no socket buffer overflows), then collect every answer until quiet. A burst waits for
    its first answer (the server is reading it: all 50 dropped is 0.3**50 here), then for 20 ms
    of quiet; a fixed 5 ms let a server starved by other tests' load fall behind until the
    kernel dropped half the datagrams before it read them."""
    answers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for start in range(0, count, burst):
            for i in range(start, min(count, start + burst)):
                sock.sendto(i.to_bytes(4, "big") * 8, (host, port))
            sock.settimeout(2)
            try:
                answers.append(sock.recvfrom(100)[0])
                sock.settimeout(0.02)
                while True:
                    answers.append(sock.recvfrom(100)[0])
            except TimeoutError:
                pass
        sock.settimeout(0.5)
        try:
            while True:
                answers.append(sock.recvfrom(100)[0])
        except TimeoutError:
            pass
    return answers


def within(observed: int, n: int, p: float) -> bool:
    """Inside a binomial 5-sigma band around n*p."""
    sigma = math.sqrt(n * p * (1 - p))
    return abs(observed - n * p) <= 5 * sigma + 1


def test_delayed_datagrams_are_bounded_in_bytes(start_server):
    """1,000 datagrams of 60 KB with delay=10s&duplicate=100: at most MAX_PENDING_BYTES of
    answers wait (4,096 answers of 64 KiB were 256 MiB before the byte bound); the rest are
    dropped and counted as such."""
    server, host, port = impaired(
        start_server, "delay=10s&duplicate=100", "--udp-rate", "1000000", "--udp-burst",
        "100000", "--udp-max-rate", "1000000", scheme="udp",
    )  # fmt: skip
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    data = b"d" * 60_000
    taken = 'socket_echo_udp_datagrams_total{direction="in"}'
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for burst in range(1, 334):  # 3 of 60 KB: what a 200 KiB receive buffer holds
            for _ in range(3):
                sock.sendto(data, (host, port))
            poll_scrape(server, lambda m, n=3 * burst: m.get(taken, 0) >= n, timeout=5)
    m = poll_scrape(
        server,
        lambda m: total(m, "socket_echo_udp_dropped_total", reason="impairment queue full") > 0,
    )
    growth = proc.memory_info().rss - before
    assert growth < 32 << 20, f"RSS grew {growth / 2**20:.0f} MiB"
    assert total(m, "socket_echo_impairments_total", kind="delayed") <= (8 << 20) // 60_000


def test_udp_drop_and_duplicate_rates_with_a_seed(start_server):
    server, host, port = impaired(start_server, "drop=30&duplicate=20&seed=7", scheme="udp")
    answers = udp_exchange(host, port, 600)
    assert all(a == a[:4] * 8 for a in answers)  # byte-exact
    m = scrape(metrics_port(server))
    received = total(m, "socket_echo_udp_datagrams_total", direction="in")  # past the kernel
    dropped = total(m, "socket_echo_impairments_total", kind="dropped")
    duplicated = total(m, "socket_echo_impairments_total", kind="duplicated")
    distinct = {a[:4] for a in answers}
    assert received >= 400, received
    assert within(int(dropped), int(received), 0.3), (dropped, received)
    assert len(distinct) == received - dropped  # every answer the server sent arrived
    assert within(int(duplicated), len(distinct), 0.2), (duplicated, len(distinct))
    assert len(answers) == len(distinct) + duplicated


def test_udp_delay_and_jitter_may_reorder_but_lose_nothing(start_server):
    _, host, port = impaired(start_server, "delay=20ms&jitter=40ms&seed=1", scheme="udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one:  # one answer, timed
        one.settimeout(2)
        started = time.monotonic()
        one.sendto(b"timed", (host, port))
        assert one.recvfrom(100)[0] == b"timed"
        assert time.monotonic() - started >= 0.02  # delay 20 ms (+ jitter)
    answers = udp_exchange(host, port, 50)
    order = [int.from_bytes(a[:4], "big") for a in answers]
    assert sorted(order) == list(range(50))
    assert order != sorted(order), "jitter of 40 ms over 50 quick datagrams reorders some"


@pytest.mark.parametrize("scheme", ["tls", "unix"])
def test_other_stream_kinds_are_impaired_too(start_server, tmp_path, scheme):
    """TLS: the reset is a TCP RST under the TLS session (no close_notify: never a clean TLS
    end). Unix sockets have no RST: there the N bytes are followed by end of stream."""
    import ssl

    if scheme == "tls":
        server = start_server(
            "--bind", "tls://127.0.0.1:0?delay=60ms&reset-after=100", "--tls-self-signed"
        )
        _, host, port = server.listener("tls")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = ctx.wrap_socket(
            socket.create_connection((host, port), timeout=5), suppress_ragged_eofs=False
        )
    else:
        path = tmp_path / "echo.sock"
        server = start_server("--bind", f"unix://{path}?delay=60ms&reset-after=100", host="")
        server.listener("unix")
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(str(path))
    with sock:
        started = time.monotonic()
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        assert time.monotonic() - started >= 0.055
        sock.sendall(b"x" * 200)
        got = b""
        try:
            while part := sock.recv(1000):
                got += part
            ended = "end of stream"
        except (ConnectionResetError, ssl.SSLError) as exc:
            ended = type(exc).__name__
    assert got == b"x" * 95  # 100 bytes echoed in all, then the end
    if scheme == "tls":
        assert ended in ("ConnectionResetError", "SSLEOFError"), ended  # not a clean close
