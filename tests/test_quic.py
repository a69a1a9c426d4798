"""quic:// listeners against aioquic's own client: real handshakes, real streams."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import ssl

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration
from conftest import (
    assert_one_line_error,
    metrics_port,
    poll_scrape,
    run_async,
    run_cli,
    scrape,
    total,
)

from socket_echo.tools.connect.quic import QuicClient

TEXT = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor " * 20)[
    :1199
]


class EchoClient(QuicClient):
    """probe's QUIC client (it collects streams, datagrams and the close), waiting 10 s by
    default."""

    async def until(self, check, timeout: float = 10.0, what: str = "echo") -> None:  # type: ignore[no-untyped-def, override]
        await super().until(check, timeout, what)


def client_config(alpn: str = "echo-quic", datagrams: bool = False) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn])
    config.verify_mode = ssl.CERT_NONE
    if datagrams:
        config.max_datagram_frame_size = 65536
    return config


def quic_server(start_server, *args: str):  # type: ignore[no-untyped-def]
    server = start_server(
        "--bind", "quic://127.0.0.1:0", "--tls-self-signed", "--metrics", "127.0.0.1:0", *args
    )
    _, host, port = server.listener("quic")
    return server, host, port


def one_stream_echo(host: str, port: int, data: bytes) -> bytes:
    """A real client's handshake and one stream's echo (FIN mirrored)."""

    async def main() -> bytes:
        async with connect(
            host, port, configuration=client_config(), create_protocol=EchoClient
        ) as client:
            client.send(0, data, end=True)
            await client.until(lambda: 0 in client.ended)
            return bytes(client.got[0])

    return run_async(main())


def test_zephyr_client_pattern_three_streams_no_fin_between_rounds(start_server):
    """As Zephyr's QUIC echo client: several streams, random 1-1199 B prefixes of a text,
    each echo awaited before the next round, no FIN between rounds."""
    server, host, port = quic_server(start_server)

    async def main() -> None:
        rng = random.Random(7)
        async with connect(
            host, port, configuration=client_config(), create_protocol=EchoClient
        ) as client:
            streams = [0, 4, 8]  # client-initiated bidirectional streams
            sent = dict.fromkeys(streams, 0)
            for _ in range(20):
                for sid in streams:
                    chunk = TEXT[: rng.randint(1, 1199)]
                    client.send(sid, chunk)
                    sent[sid] += len(chunk)
                    await client.until(lambda s=sid: len(client.got.get(s, b"")) >= sent[s])
            for sid in streams:
                client.send(sid, b"", end=True)  # FIN mirrored after the last byte
            await client.until(lambda: client.ended >= set(streams))
            for sid in streams:
                assert len(client.got[sid]) == sent[sid]

    run_async(main())
    server.wait_for_log(r"connection #1 from 127\.0\.0\.1:\d+ closed")
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_opened_total") == 1


def test_many_streams_at_once_and_a_mebibyte_on_one(start_server):
    _, host, port = quic_server(start_server)

    async def main() -> None:
        async with connect(
            host, port, configuration=client_config(), create_protocol=EchoClient
        ) as client:
            ids = []
            for i in range(100):
                sid = client._quic.get_next_available_stream_id()
                ids.append(sid)
                client.send(sid, f"stream {i:03d}".encode(), end=True)
            await client.until(lambda: client.ended >= set(ids))
            for i, sid in enumerate(ids):
                assert bytes(client.got[sid]) == f"stream {i:03d}".encode()
            big = bytes(random.Random(1).randbytes(1 << 20))
            sid = client._quic.get_next_available_stream_id()
            client.send(sid, big, end=True)
            await client.until(lambda: sid in client.ended, timeout=30)
            assert bytes(client.got[sid]) == big

    run_async(main())


def test_datagrams_are_echoed_when_the_peer_offers_them(start_server):
    _, host, port = quic_server(start_server)

    async def main() -> None:
        async with connect(
            host, port, configuration=client_config(datagrams=True), create_protocol=EchoClient
        ) as client:
            for i in range(5):
                client._quic.send_datagram_frame(f"dgram {i}".encode())
            client.transmit()
            await client.until(lambda: len(client.datagrams) >= 5)
            assert sorted(client.datagrams) == [f"dgram {i}".encode() for i in range(5)]

    run_async(main())


def test_unknown_alpn_is_refused_and_a_chosen_alpn_works(start_server):
    _, host, port = quic_server(start_server, "--quic-alpn", "lab-echo")

    async def attempt(alpn: str) -> EchoClient:
        async with connect(
            host,
            port,
            configuration=client_config(alpn),
            create_protocol=EchoClient,
            wait_connected=True,
        ) as client:
            sid = client._quic.get_next_available_stream_id()
            client.send(sid, b"alpn", end=True)
            await client.until(lambda: sid in client.ended)
            return client

    assert bytes(run_async(attempt("lab-echo")).got[0]) == b"alpn"
    with pytest.raises((ConnectionError, asyncio.TimeoutError)):
        run_async(attempt("echo-quic"))


def test_stream_limit_and_retry(start_server):
    _, host, port = quic_server(start_server, "--quic-max-streams", "4", "--quic-retry")

    async def main() -> None:
        async with connect(
            host, port, configuration=client_config(), create_protocol=EchoClient
        ) as client:
            limit = client._quic._remote_max_streams_bidi
            assert limit == 4  # what the server advertised
            assert client._quic._retry_count == 1  # the server asked for address validation
            sid = client._quic.get_next_available_stream_id()
            client.send(sid, b"after a retry", end=True)
            await client.until(lambda: sid in client.ended)
            assert bytes(client.got[sid]) == b"after a retry"

    run_async(main())


def test_initials_from_a_forbidden_port_create_nothing(start_server):
    """The UDP guard runs before any QUIC state: an Initial from source port 53 (a reflection
    risk) is dropped and counted; a real client is served meanwhile."""
    import time

    from aioquic.quic.connection import QuicConnection

    server, host, port = quic_server(start_server)
    quic = QuicConnection(configuration=client_config())
    quic.connect((host, port), now=time.monotonic())
    initial = quic.datagrams_to_send(now=time.monotonic())[0][0]  # a real client's Initial
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", 53))
        except PermissionError:
            pytest.skip("binding port 53 needs root")
        for _ in range(20):
            sock.sendto(initial, (host, port))
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_udp_dropped_total", reason="quic: privileged source port") == 20
    assert total(m, "socket_echo_connections_opened_total") == 0


def test_a_ca_file_without_a_certificate_is_named_in_one_line(tmp_path):
    """aioquic reads --ca only in the handshake, where a bad file looked like no answer."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    for command, code in (("client", 2), ("probe", 2), ("bench", 2)):  # the same code
        result = run_cli(command, "quic://127.0.0.1:9", "--ca", str(bad), "--timeout", "1")
        assert_one_line_error(result, code, f"--ca {bad}: no certificate or crl found")


def test_quic_without_a_certificate_or_with_a_bad_alpn_is_one_line():
    assert_one_line_error(run_cli("serve", "--bind", "quic://127.0.0.1:0"), 2, "--tls-cert")
    empty = run_cli("serve", "--bind", "quic://127.0.0.1:0", "--tls-self-signed", "--quic-alpn", "")
    assert_one_line_error(empty, 2, "--quic-alpn '': an ALPN name is 1 to 255 bytes")
    for command in ("client", "probe", "bench"):  # the tools' --alpn, by the same rule
        for name in ("", "a" * 256):
            bad = run_cli(command, "quic://127.0.0.1:9", "--alpn", name)
            assert_one_line_error(bad, 2, f"--alpn {name!r}: an ALPN name is 1 to 255 bytes")


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def test_probe_passes_our_server_and_names_a_refused_alpn(start_server):
    from tools_helpers import tool

    server, host, port = quic_server(start_server)
    result = tool("probe", f"quic://{host}:{port}", "--insecure", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    names = [s["name"] for s in report["steps"]]
    assert names == [
        "handshake",
        "Zephyr client pattern",
        "FIN mirrored",
        "100 streams at once",
        "1 MiB on one stream",
        "datagrams (RFC 9221)",
    ]
    result = tool("probe", f"quic://{host}:{port}", "--insecure", "--alpn", "h3", "--json")
    assert result.returncode == 2  # no handshake: nothing to measure (the exit table)
    assert result.stderr.decode().strip().splitlines() == [
        f"socket-echo: error: unreachable: quic://{host}:{port}: ALPN 'h3' refused by the server"
    ]
    server.wait_for_log(r"QUIC handshake from .* failed: No common ALPN protocols")
    assert [line for line in server.lines if not LOG_LINE.match(line)] == []  # no bare lines
    nothing = tool("probe", "quic://127.0.0.1:9", "--insecure", "--timeout", "0.5", "--json")
    assert nothing.returncode == 2 and nothing.stdout == b""
    assert b"no handshake within 0.5 s" in nothing.stderr
    assert len(nothing.stderr.splitlines()) == 1  # no stray traceback


def test_an_initial_flood_with_retry_allocates_nothing_and_a_client_is_served(start_server):
    """800 Initials from 800 source ports that never answer the Retry, and garbage: with
    --quic-retry the server keeps no state for them (address validation is stateless), its
    memory stays flat, and a real client completes its handshake and echo meanwhile."""
    import time

    import psutil
    from aioquic.quic.connection import QuicConnection

    server, host, port = quic_server(start_server, "--quic-retry")
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    socks = []
    for _ in range(800):
        quic = QuicConnection(configuration=client_config())
        quic.connect((host, port), now=time.monotonic())
        initial = quic.datagrams_to_send(now=time.monotonic())[0][0]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(initial, (host, port))
        sock.sendto(b"\x00garbage" * 10, (host, port))
        socks.append(sock)

    assert one_stream_echo(host, port, b"still served") == b"still served"
    for sock in socks:
        sock.close()
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_opened_total") == 1  # the real client only
    assert total(m, "socket_echo_udp_dropped_total", reason="quic: not a QUIC packet") >= 400
    assert proc.memory_info().rss - before < 8 << 20


def test_sigterm_drains_quic_connections_then_exits_0(start_server):
    import signal

    server, host, port = quic_server(start_server, "--graceful-timeout", "0.5")

    async def main() -> None:
        async with connect(
            host, port, configuration=client_config(), create_protocol=EchoClient
        ) as client:
            client.send(0, b"held open")
            await client.until(lambda: len(client.got.get(0, b"")) >= 9)
            server.signal(signal.SIGTERM)
            await client.until(lambda: client.terminated is not None, timeout=10)

    run_async(main())
    assert server.wait(10) == 0
    server.wait_for_log(r"connection #1 from .* closed: shutdown; in 9 B, out 9 B")


def test_client_pipes_a_mebibyte_over_one_stream_and_fails_in_one_line(start_server):
    from tools_helpers import tool

    _, host, port = quic_server(start_server)
    data = random.Random(3).randbytes(1 << 20)
    result = tool("client", f"quic://{host}:{port}", "--insecure", stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    nothing = tool("client", "quic://127.0.0.1:9", "--insecure", "--timeout", "0.5", stdin=b"x")
    assert nothing.returncode == 2
    assert nothing.stderr.decode().strip().splitlines() == [
        "socket-echo: error: unreachable: quic://127.0.0.1:9: no QUIC handshake (ALPN echo-quic)"
    ]


def test_probe_quick_is_a_health_check(start_server):
    from tools_helpers import tool

    _, host, port = quic_server(start_server)
    ok = tool("probe", f"quic://{host}:{port}", "--insecure", "--quick")
    assert ok.returncode == 0 and ok.stdout == b"" and ok.stderr == b""
    down = tool("probe", "quic://127.0.0.1:9", "--insecure", "--quick", "--timeout", "0.5")
    assert down.returncode == 2 and down.stdout == b""


def test_bench_over_quic_verifies_every_mode_and_names_a_refused_certificate(start_server):
    from tools_helpers import tool

    server, host, port = quic_server(start_server)
    for mode in ("pingpong", "stream", "churn"):
        result = tool(
            "bench", f"quic://{host}:{port}", "--insecure", "--mode", mode, "-c", "4", "-d", "0.25",
            "-p", "1", "--json", "-",
        )  # fmt: skip
        summary = json.loads(result.stdout)  # stdout is the JSON alone
        assert result.returncode == 0, summary
        assert summary["requests"] > 4 and summary["errors"] == 0 and summary["mismatches"] == 0
        if mode == "stream":  # bytes came back, verified (how fast is benchmarks/secure.py's)
            assert summary["megabytes_per_second"] > 0
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_opened_total") >= 12  # churn made many more
    refused = run_cli("bench", f"quic://{host}:{port}", "-d", "1")
    assert_one_line_error(refused, 2, "no QUIC handshake (self-signed certificate)")


def junk_initial() -> bytes:
    """1,226 bytes that look like a QUIC v1 Initial (long header, type Initial, a length
    that fits) and decrypt with no key: what a flood of junk Initials is made of."""
    dcid, scid = random.randbytes(8), random.randbytes(8)
    header = b"\xc3" + (1).to_bytes(4, "big") + b"\x08" + dcid + b"\x08" + scid + b"\x00"
    return header + (0x4000 | 1200).to_bytes(2, "big") + random.randbytes(1200)


def real_initial(host: str, port: int) -> bytes:
    """A real client's first Initial (it decrypts; its handshake is never continued)."""
    import time

    from aioquic.quic.connection import QuicConnection

    quic = QuicConnection(configuration=client_config())
    quic.connect((host, port), now=time.monotonic())
    return quic.datagrams_to_send(now=time.monotonic())[0][0]


def test_junk_initials_make_no_connection_and_lock_no_tcp_client_out(start_server):
    """150 undecryptable Initials from one socket, against --max-connections 100: none is a
    connection or a handshake; every TCP client up to the cap is still served."""
    from conftest import exchange

    server, host, port = quic_server(
        start_server, "--bind", "tcp://127.0.0.1:0", "--max-connections", "100"
    )
    dropped = "quic: undecryptable initial"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for sent in (50, 100, 150):  # in steps a receive buffer holds (about 90 such)
            for _ in range(50):
                sock.sendto(junk_initial(), (host, port))
            m = poll_scrape(
                server,
                lambda m, n=sent: total(m, "socket_echo_udp_dropped_total", reason=dropped) >= n,
            )
    assert total(m, "socket_echo_udp_dropped_total", reason=dropped) == 150
    assert total(m, "socket_echo_handshakes_in_progress") == 0
    _, _, tcp_port = server.listener("tcp")
    clients = [socket.create_connection(("127.0.0.1", tcp_port), timeout=10) for _ in range(100)]
    try:
        for i, c in enumerate(clients):
            assert exchange(c, b"tcp %d" % i) == b"tcp %d" % i
    finally:
        for c in clients:
            c.close()
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_opened_total") == 100


def test_handshakes_in_progress_have_their_own_bound_apart_from_the_cap(start_server):
    """60 real Initials never continued, --max-handshakes 20, --max-connections 10: 20
    handshakes are kept (40 Initials dropped and counted), all 10 TCP slots stay free, the
    20 time out and are named, and then a QUIC client is served."""
    from conftest import exchange

    server, host, port = quic_server(
        start_server, "--bind", "tcp://127.0.0.1:0", "--max-connections", "10",
        "--max-handshakes", "20", "--tls-handshake-timeout", "1",
    )  # fmt: skip
    socks = []
    for _ in range(60):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.sendto(real_initial(host, port), (host, port))
        socks.append(sock)
    full = "quic: handshakes in progress"
    m = poll_scrape(server, lambda m: total(m, "socket_echo_udp_dropped_total", reason=full) >= 40)
    assert total(m, "socket_echo_udp_dropped_total", reason=full) == 40
    assert total(m, "socket_echo_handshakes_in_progress") == 20
    _, _, tcp_port = server.listener("tcp")
    clients = [socket.create_connection(("127.0.0.1", tcp_port), timeout=10) for _ in range(10)]
    for i, c in enumerate(clients):
        assert exchange(c, b"slot %d" % i) == b"slot %d" % i
    for c in clients:
        c.close()
    m = poll_scrape(server, lambda m: total(m, "socket_echo_handshakes_in_progress") == 0)
    assert total(m, "socket_echo_handshakes_in_progress") == 0
    timed_out = total(m, "socket_echo_tls_handshake_failures_total", reason="handshake timeout")
    assert timed_out == 20
    for sock in socks:
        sock.close()

    assert one_stream_echo(host, port, b"after the flood") == b"after the flood"


def test_a_flood_of_handshakes_costs_bounded_memory_and_returns_it(start_server):
    """600 real Initials from 600 ports, over the default bound (256) of handshakes in
    progress: the memory they hold is the bound's, not the flood's, and it comes back once
    they time out. Sent in bursts the server's receive buffer holds (each burst judged
    before the next: polled), so every one reaches the server."""
    import psutil

    server, host, port = quic_server(
        start_server, "--tls-handshake-timeout", "3", "--udp-rate", "100000",
        "--udp-burst", "100000",
    )  # fmt: skip
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    refused = 'socket_echo_udp_dropped_total{reason="quic: handshakes in progress"}'
    in_progress = "socket_echo_handshakes_in_progress"
    expired = 'socket_echo_tls_handshake_failures_total{reason="handshake timeout"}'

    def judged(m: dict[str, float]) -> float:  # held, refused, or held and timed out
        return total(m, in_progress) + m.get(refused, 0) + m.get(expired, 0)

    socks = []
    for burst in range(15):  # 40 Initials of 1,200 B: well within a receive buffer
        for initial in [real_initial(host, port) for _ in range(40)]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.sendto(initial, (host, port))
            socks.append(sock)
        sent = 40 * (burst + 1)
        m = poll_scrape(server, lambda m, n=sent: judged(m) >= n)
        assert judged(m) == sent  # every one judged
        assert total(m, in_progress) <= 256  # never more held than the bound
    assert m.get(refused, 0) >= 600 - 256 - m.get(expired, 0)  # over the bound: refused
    peak = proc.memory_info().rss
    m = poll_scrape(server, lambda m: total(m, "socket_echo_handshakes_in_progress") == 0)
    after = proc.memory_info().rss
    for sock in socks:
        sock.close()
    assert total(m, "socket_echo_handshakes_in_progress") == 0
    assert total(m, "socket_echo_connections_opened_total") == 0
    assert peak - before < 48 << 20
    assert after - before < 32 << 20
