"""UDP echo (RFC 862) and its reflection guard, over real sockets."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tools_helpers import tool

from socket_echo.payloads import NET_TOOLS_PAYLOADS
from socket_echo.udp import native as native_udp
from socket_echo.udp.guard import BUCKETS, UdpGuard, classify

NATIVE_UDP = native_udp.available()
UDP_PATHS = [
    *([pytest.param("native", marks=pytest.mark.native)] if NATIVE_UDP else []),
    "mmsg",
    "loop",
]


@pytest.fixture(params=UDP_PATHS)
def udp_io(request: pytest.FixtureRequest) -> list[str]:
    """Every UDP data path: the native one (C), recvmmsg/sendmmsg batches from Python, and
    the portable recvfrom/sendto loop."""
    return ["--udp-io", request.param]


def udp_client(host: str = "127.0.0.1", port: int = 0, timeout: float = 2.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.settimeout(timeout)
    return sock


def answers(sock: socket.socket) -> int:
    """Datagrams that come back until the socket's timeout passes in silence."""
    n = 0
    try:
        while True:
            sock.recvfrom(10)
            n += 1
    except TimeoutError:
        return n


def answered(sock: socket.socket, target: tuple[str, int], payload: bytes) -> bytes | None:
    sock.sendto(payload, target)
    try:
        data, peer = sock.recvfrom(65535)
    except TimeoutError:
        return None
    assert peer[1] == target[1]
    return data


def bind_low_port(host: str, candidates: range) -> socket.socket | None:
    for port in candidates:
        try:
            return udp_client(host, port, timeout=0.5)
        except OSError:
            continue
    return None


def test_every_datagram_size_comes_back_over_ipv4_and_ipv6(start_server, udp_io):
    server = start_server(*udp_io, host="", expect_listeners=4)
    _, _, port = server.listener("udp")
    for host, largest in (("127.0.0.1", 65507), ("::1", 65527)):
        with udp_client(host) as sock:
            for size in (0, 1, 64, 1472, 9000, largest):
                payload = os.urandom(size)
                assert answered(sock, (host, port), payload) == payload, (host, size)


def test_zephyr_echo_client_payloads_from_its_source_port_8484(start_server, udp_io):
    server = start_server(*udp_io)
    _, host, port = server.listener("udp")
    sock = bind_low_port(host, range(8484, 8485)) or udp_client(host)
    with sock:
        for name, payload in NET_TOOLS_PAYLOADS:
            assert answered(sock, (host, port), payload) == payload, name


def test_dual_stack_udp_answers_ipv4_clients(start_server, udp_io):
    server = start_server(*udp_io, "--host", "::", expect_listeners=2)
    _, _, port = server.listener("udp")
    with udp_client("127.0.0.1") as sock:
        assert answered(sock, ("127.0.0.1", port), b"mapped") == b"mapped"


def test_guard_ignores_forbidden_source_ports_and_answers_normal_ones(start_server, udp_io):
    server = start_server(*udp_io, "--log-format", "text")
    _, host, port = server.listener("udp")
    forbidden = [
        bind_low_port(host, range(700, 1000)),  # privileged (needs root to bind: else skipped)
        bind_low_port(host, range(2049, 2050)),  # NFS
        bind_low_port("127.0.0.2", range(port, port + 1)),  # this server's own port
    ]
    usable = [s for s in forbidden if s is not None]
    if not usable:
        pytest.skip("cannot bind any forbidden source port here")
    for sock in usable:
        with sock:
            assert answered(sock, (host, port), b"reflect me") is None, sock.getsockname()
    with udp_client(host) as normal:
        assert answered(normal, (host, port), b"fine") == b"fine"
    server.signal(signal.SIGTERM)
    server.wait_for_log(r"UDP datagrams dropped: .*source port")


def test_privileged_ports_allowed_for_labs(start_server, udp_io):
    server = start_server(*udp_io, "--udp-allow-privileged-ports")
    _, host, port = server.listener("udp")
    sock = bind_low_port(host, range(700, 1000))
    if sock is None:
        pytest.skip("cannot bind a port below 1024 here")
    with sock:
        assert answered(sock, (host, port), b"lab") == b"lab"
    nfs = bind_low_port(host, range(2049, 2050))
    if nfs is not None:
        with nfs:  # the flag lifts the below-1024 rule only
            assert answered(nfs, (host, port), b"nfs") is None


def test_rate_limit_per_prefix_drops_excess_and_spares_other_prefixes(start_server, udp_io):
    server = start_server(*udp_io, "--udp-rate", "20", "--udp-burst", "10")
    _, host, port = server.listener("udp")
    with udp_client("127.0.0.1", timeout=0.2) as flood:
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        started = time.monotonic()
        for i in range(300):
            flood.sendto(i.to_bytes(4, "big"), (host, port))
        replies = 0
        try:
            while True:
                flood.recvfrom(100)
                replies += 1
        except TimeoutError:
            pass
        elapsed = time.monotonic() - started
    assert 10 <= replies <= 10 + 20 * elapsed + 5, replies
    with udp_client("127.0.1.1") as other:  # another /24: its own bucket
        assert answered(other, (host, port), b"other prefix") == b"other prefix"
    server.signal(signal.SIGTERM)  # drops are reported every 10 s, and once more on the way out
    assert server.wait(10) == 0
    lines = [ln for ln in server.lines if "UDP datagrams dropped" in ln]
    assert len(lines) == 1 and re.search(r"dropped: \d+ source rate limit", lines[0]), lines


def test_global_rate_cap(start_server, udp_io):
    server = start_server(*udp_io, "--udp-max-rate", "5", "--udp-burst", "1000")
    _, host, port = server.listener("udp")
    total = 0
    started = time.monotonic()
    for source in ("127.0.2.1", "127.0.3.1", "127.0.4.1"):
        with udp_client(source, timeout=0.2) as sock:
            for _i in range(100):
                sock.sendto(b"x", (host, port))
            total += answers(sock)
    # 1 s of burst (5), then 5/s: all of the burst answered, hardly more
    assert 5 <= total <= 5 + 5 * (time.monotonic() - started) + 2, total


def test_the_global_cap_is_one_bucket_over_every_path_at_once(start_server):
    """A plain UDP listener (the native path where built) and an impaired one (the Python
    path) loaded at once: --udp-max-rate 5 is over all sources of the process. It was two
    buckets (the C guard's and Python's): twice the answers."""
    server = start_server(
        "--bind", "udp://127.0.0.1:0", "--bind", "udp://127.0.0.1:0?delay=1ms",
        "--udp-max-rate", "5", "--udp-burst", "1000", "--udp-rate", "1000",
        expect_listeners=2,
    )  # fmt: skip
    ports = [port for _, _, port in server.listeners_of("udp")]
    assert len(ports) == 2
    total = 0
    started = time.monotonic()
    with udp_client("127.0.5.1", timeout=0.3) as sock:
        for _ in range(50):
            for port in ports:
                sock.sendto(b"x", ("127.0.0.1", port))
        total += answers(sock)
    # one bucket: 1 s of burst (5), then 5/s; two buckets answered 10 and more
    assert 5 <= total <= 5 + 5 * (time.monotonic() - started) + 2, total


def test_probe_and_bench_pass_over_udp(start_server, udp_io):
    server = start_server(
        *udp_io, "--udp-rate", "100000", "--udp-burst", "100000", "--udp-max-rate", "1000000"
    )
    _, host, port = server.listener("udp")
    result = tool("probe", f"udp://{host}:{port}")
    assert result.returncode == 0, result.stdout
    result = tool("bench", f"udp://{host}:{port}", "-c", "4", "-d", "0.25", "-p", "1")
    assert result.returncode == 0, result.stdout


# -- the guard as a pure function --------------------------------------------------------


@pytest.mark.parametrize(
    "host, reason",
    [
        ("224.0.0.1", "multicast source"),
        ("239.255.255.250", "multicast source"),
        ("255.255.255.255", "broadcast source"),
        ("0.0.0.0", "martian source"),
        ("0.1.2.3", "martian source"),
        ("240.0.0.1", "martian source"),
        ("::", "martian source"),
        ("ff02::1", "multicast source"),
        ("::ffff:224.0.0.1", "multicast source"),
        ("::ffff:255.255.255.255", "broadcast source"),
        ("::ffff:0.0.0.0", "martian source"),
        ("::1.2.3.4", "martian source"),
        ("not an address", "martian source"),
    ],
)
def test_martian_sources_are_never_answered(host, reason):
    assert classify(host)[0] == reason


@pytest.mark.parametrize(
    "host, prefix",
    [
        ("127.0.0.1", "127.0.0.0"),
        ("192.0.2.77", "192.0.2.0"),
        ("::ffff:192.0.2.77", "192.0.2.0"),
        ("2001:db8:1:2ff::1", "2001:db8:1:200::"),
        ("::1", "::"),
    ],
)
def test_rate_limit_prefixes(host, prefix):
    assert classify(host) == (None, prefix)


@given(st.ip_addresses())
def test_classify_any_address(ip):
    reason, prefix = classify(str(ip))
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    judged = mapped or ip
    if judged.is_multicast:
        assert reason == "multicast source"
    if reason is None:
        assert ipaddress.ip_address(prefix) in ipaddress.ip_network(
            f"{judged}/{24 if judged.version == 4 else 56}", strict=False
        )


def test_bucket_table_is_bounded_under_a_spoofed_flood():
    guard = UdpGuard(rate=1, burst=1, max_rate=1e9)
    for i in range(BUCKETS + 5000):
        guard.check(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000, now=i * 1e-6)
    assert len(guard.buckets) <= BUCKETS


def test_never_answers_forbidden_ports():
    guard = UdpGuard(rate=1e9, burst=1e9, max_rate=1e9, own_ports=frozenset({4242}))
    for port in (0, 7, 19, 53, 123, 1023, 2049, 4242):
        assert guard.check("127.0.0.1", port, 0.0) is not None, port
    assert guard.check("127.0.0.1", 8484, 0.0) is None


@pytest.mark.parametrize("twin", ["python", "c"])
def test_allowing_privileged_ports_lifts_that_rule_alone(twin):
    """--udp-allow-privileged-ports, in-process (binding a port below 1024 needs root, so the
    real-socket test above skips elsewhere): ports below 1024 are answered, port 0, NFS's
    2049 and our own ports still are not; without the flag none below 1024 is."""
    if twin == "c" and not NATIVE_UDP:
        pytest.skip("the native extension is not built here")
    raw, family = socket.inet_pton(socket.AF_INET, "127.0.0.1"), socket.AF_INET

    def guard(allow: bool):  # type: ignore[no-untyped-def]
        g = UdpGuard(1e9, 1e9, 1e9, allow, frozenset({4242}))
        if twin == "c":
            c = g.native()
            return lambda port: c.check(raw, family, port, 0.0)
        return lambda port: g.check(raw, port, 0.0, family)

    allowed, default = guard(True), guard(False)
    for port in (7, 19, 123, 700, 1023):
        assert allowed(port) is None, port
        assert default(port) is not None, port
    for port in (0, 2049, 4242):
        assert allowed(port) is not None, port
    assert allowed(8484) is None and default(8484) is None


# -- the C twin of the guard ----------------------------------------------------------------

SPECIAL_SOURCES = [
    "192.0.2.7",
    "198.51.100.1",
    "0.0.0.0",
    "0.1.2.3",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "127.0.0.1",
    "10.1.2.3",
    "::1",
    "::",
    "::5",
    "::ffff:192.0.2.7",
    "::ffff:224.0.0.1",
    "::ffff:255.255.255.255",
    "ff02::1",
    "2001:db8::1",
    "2001:db8:0:ff::1",
    "2001:db8:0:100::1",
    "fe80::1",
]


@pytest.mark.skipif(not NATIVE_UDP, reason="the native extension is not built here")
@given(
    events=st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from(SPECIAL_SOURCES),
                st.ip_addresses(v=4).map(str),
                st.ip_addresses(v=6).map(str),
                st.integers(0, 40).map(lambda i: f"203.0.{i}.9"),  # few prefixes: buckets fill
            ),
            st.sampled_from([0, 7, 53, 1023, 1024, 2049, 4242, 5353, 40000, 65535]),
            st.integers(0, 3),  # clock steps of 0, 1, 2, 3 x 50 ms
        ),
        max_size=300,
    ),
    max_sources=st.sampled_from([16, 64]),
)
def test_the_c_guard_gives_the_python_guards_verdicts(events, max_sources):
    """The native UDP path's guard (C) and udp/guard.py judge every datagram alike: ports,
    martians, per-prefix and global buckets, and which prefixes a full table forgets."""
    args = {"rate": 20.0, "burst": 3.0, "max_rate": 60.0, "own_ports": frozenset({4242})}
    twin = UdpGuard(**args, max_sources=max_sources)
    c_guard = UdpGuard(**args, max_sources=max_sources).native()
    now = 100.0
    for host, port, step in events:
        now += step * 0.05
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.inet_pton(family, host)
        assert c_guard.check(raw, family, port, now) == twin.check(raw, port, now, family), (
            host,
            port,
            now,
        )
    assert c_guard.sources == len(twin.buckets)


def test_bench_explains_lost_datagrams_against_a_default_server(start_server):
    """A user benchmarking a default server on loopback meets its per-source rate limit: the
    report says how many answers were missing and which server flags lift the limit."""
    server = start_server()
    _, host, port = server.listener("udp")
    result = tool("bench", f"udp://{host}:{port}", "-c", "20", "-d", "1.5", "-p", "1")
    out = result.stdout.decode()
    assert "note: " in out and "got no answer within" in out, out
    assert "per-source rate limit" in out and "--udp-rate 1e7" in out, out
    lifted = start_server("--udp-rate", "1e7", "--udp-burst", "100000", "--udp-max-rate", "1e7")
    _, host, port = lifted.listener("udp")
    result = tool(
        "bench", f"udp://{host}:{port}", "-c", "20", "-d", "0.25", "-p", "1", "--json", "-"
    )
    report = json.loads(result.stdout)
    assert report["lost_datagrams"] == 0 and report["loss_explanation"] is None
