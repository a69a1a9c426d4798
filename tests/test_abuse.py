"""Abuse: floods, slowloris, stalled readers, spoof-like UDP, hostile TLS and PROXY input.

Each test asserts the outcome (no byte lost, bounded memory, every abuser closed, everyone
else served) and records its figures, which the test run's summary lists."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Callable

import psutil
import pytest
from conftest import exchange, metrics_port, recv_exactly, scrape, total, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socket_echo.gates.proxy import ProxyHeader, ProxyHeaderError, build_v1, build_v2, parse

MiB = 1024 * 1024


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


class Sampler:
    """The server's peak RSS, sampled every 50 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / MiB


class Steady:
    """Clients that keep echoing during the abuse: every reply is checked, round trips kept."""

    def __init__(self, connect: Callable[[], socket.socket], clients: int, size: int) -> None:
        self.socks = [connect() for _ in range(clients)]
        self.size = size
        self.rtts: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rand = random.Random(3)
        while not self._stop.is_set():
            for sock in self.socks:
                payload = rand.randbytes(self.size)
                t0 = time.perf_counter()
                try:
                    got = exchange(sock, payload) if self.size > 4096 else _ping(sock, payload)
                except OSError as exc:
                    self.errors.append(str(exc))
                    return
                if got != payload:
                    self.errors.append("wrong bytes")
                    return
                self.rtts.append(time.perf_counter() - t0)
            time.sleep(0.01)

    def __enter__(self) -> Steady:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for sock in self.socks:
            sock.close()

    def p99_ms(self) -> float:
        return statistics.quantiles(self.rtts, n=100)[98] * 1000 if len(self.rtts) > 2 else 0.0


def _ping(sock: socket.socket, payload: bytes) -> bytes:
    """A small round trip in this thread (exchange()'s sender thread would weigh on the RTT)."""
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def nonblocking_connects(
    address: tuple[str, int], count: int, rcvbuf: int = 0
) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        if rcvbuf:  # before connect: the window the server may fill
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setblocking(False)
        err = s.connect_ex(address)
        assert err in (0, errno.EINPROGRESS, errno.EAGAIN), os.strerror(err)
        socks.append(s)
    return socks


def writable(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets that can take bytes now (poll: select() stops at descriptor 1024)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLOUT)
    return [by_fd[fd] for fd, ev in poller.poll(timeout * 1000) if ev & select.POLLOUT]


def test_connection_flood_leaves_connected_clients_responsive(start_server, figure):
    limit, attempts = 100, 2000  # 20x --max-connections
    server = start_server(
        "--max-connections",
        str(limit),
        "--metrics",
        "127.0.0.1:0",
        "--no-access-log",
        measured=False,
    )
    mport = metrics_port(server)
    rejected_total = "socket_echo_connections_rejected_total"
    with Sampler(server.pid) as mem, Steady(server.connect, 10, 64) as steady:
        wait_until(lambda: len(steady.rtts) >= 200, 10, "round trips before the flood")
        before = steady.p99_ms()
        steady.rtts.clear()
        flood = nonblocking_connects((server.host, server.port), attempts)
        wait_until(  # the server has judged the whole flood (polled, not slept for)
            lambda: (
                total(scrape(mport), rejected_total, reason="max_connections") >= attempts - limit
            ),
            10,
            "the flood's rejections",
        )
        for s in flood:
            s.close()
        wait_until(lambda: len(steady.rtts) >= 200, 10, "round trips after the flood")
    assert not steady.errors, steady.errors
    m = scrape(mport)
    rejected = total(m, rejected_total, reason="max_connections")
    assert rejected >= attempts - limit
    with server.connect() as c:  # the flood is over: new clients get in
        assert exchange(c, b"after the flood") == b"after the flood"
    assert mem.growth_mib < 32
    figure(
        f"{attempts} connects against --max-connections {limit}: {rejected:.0f} refused; "
        f"10 connected clients' p99 round trip {before:.2f} ms before, "
        f"{steady.p99_ms():.2f} ms during ({len(steady.rtts)} round trips, 0 errors); "
        f"server RSS +{mem.growth_mib:.1f} MiB"
    )


def test_slowloris_is_reclaimed_by_the_idle_timeout(start_server, figure):
    count = 2000
    server = start_server(
        "--idle-timeout", "2", "--metrics", "127.0.0.1:0", "--no-access-log", measured=False
    )
    mport = metrics_port(server)
    with Sampler(server.pid) as mem, Steady(server.connect, 1, 64) as steady:
        socks = nonblocking_connects((server.host, server.port), count)
        started = time.monotonic()
        pending = set(socks)
        while pending:  # one byte each, as soon as each is connected
            ready = writable(list(pending), 5)
            assert ready, "connections did not complete"
            for s in ready:
                s.send(b"x")
                pending.discard(s)
        reclaimed = wait_until(
            lambda: (
                total(scrape(mport), "socket_echo_connections_closed_total", reason="idle timeout")
                >= count
            ),
            20,
            "slowloris connections closed",
        )
    elapsed = time.monotonic() - started
    for s in socks:  # each got its one byte back, then the server closed it
        s.setblocking(True)
        s.settimeout(5)
        got = b""
        while chunk := s.recv(10):
            got += chunk
        assert got == b"x"
        s.close()
    assert not steady.errors, steady.errors  # an active client is never idle
    m = scrape(mport)
    assert m["socket_echo_connections_active"] == 0
    figure(
        f"{count} one-byte connections reclaimed {elapsed:.1f} s after they opened "
        f"(--idle-timeout 2; {reclaimed:.1f} s of waiting), an active client unaffected "
        f"(p99 {steady.p99_ms():.2f} ms); server RSS +{mem.growth_mib:.1f} MiB"
    )


def kernel_send_buffer_max() -> int:
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * MiB


def test_stalled_readers_in_bulk_stay_bounded_and_are_closed(start_server, figure):
    """300 clients send 1 MiB each and never read. On loopback the kernel absorbs about
    3 MiB of echo per connection, so they stall in kernel buffers and the sweep closes them as
    idle; 20 heavier ones push until the server itself holds echo it cannot send, and are
    closed as 'write stalled'. What the server holds in user space stays bounded."""
    # The heavy ones must outgrow the server's kernel send buffer (autotuned up to the third
    # field of tcp_wmem, 4 MiB here) before the server itself holds echo.
    heavy_each = 4 * kernel_send_buffer_max()
    count, each, heavy_count = 300, MiB, 20
    server = start_server(
        "--idle-timeout", "3", "--metrics", "127.0.0.1:0", "--no-access-log", measured=False
    )
    mport = metrics_port(server)
    bound_mib = (count + heavy_count) * 64 * 1024 / MiB  # one 64 KiB read held at most each
    with Sampler(server.pid) as mem, Steady(server.connect, 1, 64 * 1024) as steady:
        address = (server.host, server.port)
        light = nonblocking_connects(address, count, rcvbuf=8192)
        heavy = nonblocking_connects(address, heavy_count, rcvbuf=8192)
        quota = {**dict.fromkeys(light, each), **dict.fromkeys(heavy, heavy_each)}
        sent = dict.fromkeys(quota, 0)
        chunk = os.urandom(64 * 1024)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = writable([s for s in quota if sent[s] < quota[s]], 0.5)
            if not ready:
                break  # everyone is done or blocked: the server stopped reading them
            for s in ready:
                with contextlib.suppress(BlockingIOError):
                    sent[s] += s.send(chunk[: quota[s] - sent[s]])
        waited = wait_until(
            lambda: scrape(mport)["socket_echo_connections_active"] <= 1,
            30,
            "stalled readers closed",
        )
    m = scrape(mport)
    stalled = total(m, "socket_echo_connections_closed_total", reason="write stalled")
    idle = total(m, "socket_echo_connections_closed_total", reason="idle timeout")
    assert stalled + idle == count + heavy_count
    assert stalled >= heavy_count  # the ones the kernel could not hide
    assert not steady.errors, steady.errors
    assert mem.growth_mib < bound_mib + 16
    for s in quota:
        s.close()
    figure(
        f"{count} clients x 1 MiB + {heavy_count} x up to {heavy_each // MiB} MiB, never reading "
        f"({sum(sent.values()) / MiB:.0f} MiB sent): {stalled:.0f} closed as 'write stalled', "
        f"{idle:.0f} as idle, {waited:.1f} s after the load (--idle-timeout 3); server RSS "
        f"+{mem.growth_mib:.1f} MiB (bound {bound_mib:.0f} MiB + 16); a 64 KiB echo client "
        f"unaffected (p99 {steady.p99_ms():.1f} ms)"
    )


def udp_settled(mport: int) -> Callable[[], bool]:
    """A check that is true once the server's UDP count stopped moving between two looks."""
    last = [-1.0]

    def check() -> bool:
        now = total(scrape(mport), "socket_echo_udp_datagrams_total", direction="in")
        settled, last[0] = now == last[0], now
        if not settled:
            time.sleep(0.1)
        return settled

    return check


def test_udp_spoof_like_flood_keeps_the_rate_table_bounded(start_server, figure):
    prefixes, per_source, table = 3000, 3, 256
    server = start_server(
        "--udp-max-sources", str(table), "--metrics", "127.0.0.1:0", expect_listeners=2
    )
    mport = metrics_port(server)
    _, host, port = server.listener("udp")
    payload = os.urandom(200)
    socks, peak = [], 0
    with Sampler(server.pid) as mem:
        for i in range(prefixes):  # 127.A.B.1: a new /24 each time, a new source port each
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.{1 + i // 200}.{i % 200}.1", 0))
            s.setblocking(False)
            for _ in range(per_source):
                s.sendto(payload, (host, port))
            socks.append(s)
            if i % 250 == 0:
                peak = max(peak, scrape(mport)["socket_echo_udp_rate_buckets"])
        wait_until(udp_settled(mport), 10, "the server to take every datagram")
        peak = max(peak, scrape(mport)["socket_echo_udp_rate_buckets"])
    answered_bytes = 0
    for s in socks:
        got = 0
        while True:
            try:
                data = s.recv(65535)
            except BlockingIOError:
                break
            assert data == payload
            got += len(data)
        assert got <= per_source * len(payload)  # never more back than a source sent
        answered_bytes += got
        s.close()
    sent_bytes = prefixes * per_source * len(payload)
    m = scrape(mport)
    assert peak <= table
    # Every answer the server counts arrived, byte for byte; it answered (the kernel may drop
    # some of the flood before the server sees it), and never more than it received.
    assert 0 < answered_bytes == total(m, "socket_echo_udp_bytes_total", direction="out")
    assert answered_bytes <= total(m, "socket_echo_udp_bytes_total", direction="in")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as normal:
        normal.settimeout(2)
        normal.sendto(b"still answered", (host, port))
        assert normal.recvfrom(100)[0] == b"still answered"
    figure(
        f"{prefixes} source prefixes x {per_source} datagrams from fresh ports: "
        f"{answered_bytes}/{sent_bytes} B answered, rate table peak {peak:.0f} "
        f"(--udp-max-sources {table}); server RSS +{mem.growth_mib:.1f} MiB"
    )


def client_hello() -> bytes:
    """A real ClientHello, made in memory."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def tls_client(port: int) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def test_tls_half_open_and_garbage_handshakes_are_closed_and_named(start_server, figure):
    server = start_server(
        "--bind",
        "tls://127.0.0.1:0",
        "--tls-self-signed",
        "--tls-handshake-timeout",
        "1",
        "--max-handshakes",
        "1000",  # all 400 held to their timeout (the bound's own test is in test_tls.py)
        "--metrics",
        "127.0.0.1:0",
        "--no-access-log",
    )
    mport = metrics_port(server)
    port = server.listener("tls")[2]
    hello = client_hello()
    silent = nonblocking_connects(("127.0.0.1", port), 200)
    partial = nonblocking_connects(("127.0.0.1", port), 100)
    garbage = nonblocking_connects(("127.0.0.1", port), 100)
    time.sleep(0.2)
    for s in partial:
        s.send(hello[: len(hello) // 2])
    rand = random.Random(5)
    for s in garbage:
        s.send(rand.randbytes(600))
    with tls_client(port) as good:  # a real client meanwhile
        assert exchange(good, b"through the abuse") == b"through the abuse"
    waited = wait_until(
        lambda: total(scrape(mport), "socket_echo_tls_handshake_failures_total") >= 400,
        15,
        "every hostile handshake counted",
    )
    m = scrape(mport)
    timeouts = total(m, "socket_echo_tls_handshake_failures_total", reason="handshake timeout")
    assert timeouts >= 300  # the silent and the half-sent ones
    for s in silent + partial + garbage:
        assert_closed_by_server(s)
    reasons = {
        k.split('reason="')[1].rstrip('"}'): v
        for k, v in m.items()
        if k.startswith("socket_echo_tls_handshake_failures_total")
    }
    figure(
        f"400 hostile handshakes (200 silent, 100 half a ClientHello, 100 garbage) all closed "
        f"within {waited + 1:.1f} s (--tls-handshake-timeout 1): {reasons}; a real client served"
    )


def assert_closed_by_server(sock: socket.socket) -> None:
    """EOF or reset within 5 s (a timeout fails the test), then close ours."""
    sock.setblocking(True)
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    finally:
        sock.close()


def test_tls_renegotiation_is_refused(start_server, figure):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl here")
    server = start_server("--bind", "tls://127.0.0.1:0", "--tls-self-signed")
    port = server.listener("tls")[2]
    proc = subprocess.Popen(
        ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{port}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"before\n")
        proc.stdin.flush()
        seen = b""
        while b"\nbefore\n" not in seen:  # the echo works before the attempt
            line = proc.stdout.readline()
            assert line, seen.decode(errors="replace")
            seen += line
        proc.stdin.write(b"R\n")  # s_client's command letter: renegotiate (TLS 1.2)
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (seen + out).decode(errors="replace")
    assert "RENEGOTIATING" in text
    assert "no renegotiation" in text, text[-500:]
    with tls_client(port) as good:
        assert exchange(good, b"still serving") == b"still serving"
    figure("TLS 1.2 renegotiation (openssl s_client 'R') refused: 'no renegotiation'")


# -- PROXY protocol at scale, over real sockets ---------------------------------------------

addresses4 = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)


@st.composite
def mutated_headers(draw):  # type: ignore[no-untyped-def]
    src, dst = (draw(addresses4), draw(ports)), (draw(addresses4), draw(ports))
    header = bytearray(build_v1(src, dst) if draw(st.booleans()) else build_v2(src, dst))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(header) - 1))
        header[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(header)))
    return bytes(header[:cut] if draw(st.booleans()) else header)


@pytest.fixture(scope="module")
def proxy_server():  # type: ignore[no-untyped-def]
    from conftest import ServerProcess

    server = ServerProcess(["--bind", "tcp+proxy://127.0.0.1:0", "--no-access-log"])
    yield server.listener("tcp+proxy")[2]
    server.kill()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(mutated_headers(), st.binary(max_size=200)), st.binary(max_size=64))
def test_random_and_mutated_headers_over_a_real_listener(proxy_server, header, payload):
    """The server's verdict on each header is the parser's: a valid one is consumed and
    the payload echoed; anything else closes without echoing a byte."""
    try:
        parsed = parse(header + payload)
    except ProxyHeaderError:
        parsed = None
    expected = (header + payload)[parsed.length :] if isinstance(parsed, ProxyHeader) else b""
    with socket.create_connection(("127.0.0.1", proxy_server), timeout=10) as sock:
        sock.sendall(header + payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    assert got == expected
