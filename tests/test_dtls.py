"""dtls:// listeners: real DTLS 1.2 handshakes over real sockets, with the tools' client
(pyOpenSSL), mbedTLS itself (python-mbedtls, what Zephyr links), and hand-made datagrams for
the abuse cases."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import trustme
from conftest import assert_one_line_error, metrics_port, run_async, run_cli, scrape, total
from OpenSSL import SSL
from tools_helpers import tool

from socket_echo.dtls_wire import (
    APPLICATION_DATA,
    HELLO_VERIFY_REQUEST,
    handshake_type,
    pack,
    split_records,
)
from socket_echo.tools.connect.dtls import DtlsFailed, client_context, open_dtls
from socket_echo.tools.connect.target import Target, TlsOptions

INSECURE = TlsOptions(insecure=True)


def dtls_server(start_server, *args: str):  # type: ignore[no-untyped-def]
    server = start_server(
        "--bind", "dtls://127.0.0.1:0", "--tls-self-signed", "--metrics", "127.0.0.1:0", *args
    )
    _, host, port = server.listener("dtls")
    return server, Target("dtls", host, port)


async def echoes(target: Target, records: list[bytes], tls: TlsOptions = INSECURE, **kw):  # type: ignore[no-untyped-def]
    client = await open_dtls(target, tls, 5, **kw)
    got = []
    try:
        for record in records:
            client.send(record)
            got.append(await client.recv(5))
    finally:
        client.close()
    return client, got


def raw_client() -> SSL.Connection:
    """A DTLS client on memory BIOs, driven by hand (the abuse cases)."""
    conn = SSL.Connection(client_context(INSECURE), None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1200)
    return conn


def cookie_exchange(sock: socket.socket, conn: SSL.Connection) -> None:
    """By hand, on a connected socket: ClientHello, HelloVerifyRequest, ClientHello with the
    cookie (a session exists on the server from here)."""
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    sock.send(conn.bio_read(65536))
    conn.bio_write(sock.recv(65536))  # the HelloVerifyRequest
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    sock.send(conn.bio_read(65536))


def client_hello() -> bytes:
    """A real ClientHello without a cookie, as the first datagram of any DTLS client."""
    conn = raw_client()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def without_sequence(datagram: bytes) -> list[bytes]:
    return [r[:5] + r[11:] for r in split_records(datagram)]


# -- the wire helpers (pure) --------------------------------------------------------------
def test_records_are_split_and_packed_whole_and_application_records_go_alone():
    def record(kind: int, n: int) -> bytes:
        return bytes([kind, 0xFE, 0xFD]) + bytes(8) + n.to_bytes(2, "big") + b"x" * n

    flight = [record(22, 500), record(22, 500), record(22, 500), record(20, 1)]
    assert split_records(b"".join(flight) + b"\x16\xfe") == flight  # a torn tail is dropped
    datagrams = pack(flight, 1200)
    assert [len(d) for d in datagrams] == [1026, 527]  # whole records, at most the MTU
    apps = [record(APPLICATION_DATA, 10), record(APPLICATION_DATA, 20)]
    assert pack(apps, 1200) == apps  # each echo is one record in one datagram


def test_cookies_rotate_and_the_previous_secret_still_verifies():
    from socket_echo.servers.dtls import CookieJar

    now = [0.0]
    jar = CookieJar(60.0, lambda: now[0])

    class Conn:
        def get_app_data(self) -> bytes:
            return b"127.0.0.1|5555"

    cookie = jar.generate(Conn())  # type: ignore[arg-type]
    assert jar.verify(Conn(), cookie)  # type: ignore[arg-type]
    now[0] = 61.0
    assert jar.verify(Conn(), cookie)  # type: ignore[arg-type]  # under the previous secret
    now[0] = 122.0
    assert not jar.verify(Conn(), cookie)  # type: ignore[arg-type]  # two rotations: gone

    class Other(Conn):
        def get_app_data(self) -> bytes:
            return b"127.0.0.1|5556"

    assert not jar.verify(Other(), jar.generate(Conn()))  # type: ignore[arg-type]


# -- real sessions ------------------------------------------------------------------------
def test_records_come_back_as_records_after_a_cookie_exchange(start_server):
    """net-tools' dtls-client payloads, a 1200-byte record and a 16 KiB one, each echoed as
    one record; the server asked for a cookie first and counted it; close_notify is answered."""
    server, target = dtls_server(start_server)
    records = [b"A", b"foobar", b"\0\1\2\3", b"\0", bytes(range(256)), b"y" * 1200, b"z" * 16384]
    client, got = run_async(echoes(target, records))
    assert got == records
    assert client.hello_verify
    server.wait_for_log(r"connection #1 from 127\.0\.0\.1:\d+ closed: peer closed; in 17852 B")
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_dtls_hello_verify_requests_total") == 1
    assert total(m, "socket_echo_connections_opened_total", listener=target.url) == 1


def test_mbedtls_dtls_client_with_rsa_key_exchange_needs_compat(start_server, tmp_path):
    """mbedTLS's own DTLS client (cookie exchange and all) offering only the RSA suite a
    default Zephyr build enables: refused by the secure default, served with compat."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    flags = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    script = os.path.join(os.path.dirname(__file__), "mbedtls_client.py")
    payloads = [b"A", b"foobar", b"The quick brown fox jumps", bytes(range(256))]

    def mbedtls(port: int, wait: float) -> list[bytes] | None:
        argv = [sys.executable, script, "--dtls", str(port), "TLS-RSA-WITH-AES-128-CBC-SHA256"]
        try:
            done = subprocess.run(
                argv + [p.hex() for p in payloads], capture_output=True, text=True, timeout=wait
            )
        except subprocess.TimeoutExpired:
            return None
        return [bytes.fromhex(h) for h in done.stdout.split()] if done.returncode == 0 else None

    secure = start_server("--bind", "dtls://127.0.0.1:0", *flags)
    assert mbedtls(secure.listener("dtls")[2], 3.0) is None
    secure.wait_for_log(r"DTLS handshake from .* failed: no shared cipher")
    compat = start_server("--bind", "dtls://127.0.0.1:0", *flags, "--tls-ciphers", "compat")
    compat.wait_for_log(r"DTLS 1\.2: cipher suites \(--tls-ciphers compat\): .*AES128-SHA256")
    assert mbedtls(compat.listener("dtls")[2], 10.0) == payloads


def test_hellos_without_cookies_forged_cookies_and_garbage_keep_nothing(start_server):
    """2,000 ClientHellos from 2,000 source ports, a ClientHello carrying another address's
    cookie, and garbage: each cookieless hello gets one small HelloVerifyRequest (no
    amplification), nothing is admitted, memory stays flat, a real client is served."""
    import psutil

    server, target = dtls_server(start_server, "--udp-rate", "1e6", "--udp-burst", "1000000")
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    hello = client_hello()
    socks, answers = [], []
    for _ in range(40):  # in batches, so no datagram is lost to a full socket buffer
        batch = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
        for sock in batch:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
            sock.sendto(hello, (target.host, target.port))
            sock.sendto(b"\x17garbage" * 10, (target.host, target.port))
        answers += [sock.recv(65536) for sock in batch]  # one answer each
        socks += batch
    assert all(handshake_type(a) == HELLO_VERIFY_REQUEST for a in answers)
    assert max(len(a) for a in answers) < len(hello)  # smaller than what asked: no amplifier
    # A cookie valid for socks[0]'s address, sent from socks[1]: it must not verify.
    conn = raw_client()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    conn.bio_read(65536)
    conn.bio_write(answers[0])
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    with_cookie = conn.bio_read(65536)
    socks[1].sendto(with_cookie, (target.host, target.port))
    assert handshake_type(socks[1].recv(65536)) == HELLO_VERIFY_REQUEST  # asked again

    _, got = run_async(echoes(target, [b"still served"]))
    assert got == [b"still served"]
    for sock in socks:
        sock.close()
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_opened_total") == 1  # the real client only
    assert total(m, "socket_echo_dtls_hello_verify_requests_total") == 2002
    assert total(m, "socket_echo_udp_dropped_total", reason="dtls: not a ClientHello") == 2000
    assert proc.memory_info().rss - before < 8 << 20


def test_the_guard_limits_hellos_per_source_before_any_dtls_work(start_server):
    server, target = dtls_server(start_server, "--udp-rate", "1", "--udp-burst", "5")
    hello = client_hello()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(20):
            sock.sendto(hello, (target.host, target.port))
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_udp_dropped_total", reason="dtls: source rate limit") >= 14
    assert total(m, "socket_echo_dtls_hello_verify_requests_total") <= 6


def test_a_silent_client_is_retransmitted_to_then_timed_out_and_idle_sessions_closed(
    start_server,
):
    """A client that stops after its cookie: the server's flight comes again (its
    retransmission timer), then --tls-handshake-timeout ends it. An idle established
    session gets a close_notify after --idle-timeout."""
    server, target = dtls_server(start_server, "--tls-handshake-timeout", "1.5")
    conn = raw_client()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((target.host, target.port))
        cookie_exchange(sock, conn)  # then silence
        flights = []
        sock.settimeout(1.2)  # the flight comes again after 1 s, then the session is gone
        with pytest.raises(TimeoutError):
            while True:
                flights.append(sock.recv(65536))
    # the same flight again (each record with a new sequence number)
    assert len(flights) >= 2 and without_sequence(flights[0]) == without_sequence(flights[-1])
    server.wait_for_log(r"DTLS handshake from 127\.0\.0\.1:\d+ failed: handshake timeout")
    server.wait_for_log(r"closed: handshake timeout")
    server, target = dtls_server(start_server, "--idle-timeout", "1")

    async def idle() -> bool:
        client = await open_dtls(target, INSECURE, 5)
        with pytest.raises(DtlsFailed, match="close_notify"):
            await client.recv(5)
        client.close()
        return client.endpoint.peer_closed

    assert run_async(idle())
    server.wait_for_log(r"closed: idle timeout")


def test_over_the_cap_a_client_gets_an_alert_and_nothing_is_kept(start_server):
    server, target = dtls_server(start_server, "--max-connections", "1")

    async def main() -> None:
        first = await open_dtls(target, INSECURE, 5)
        with pytest.raises(DtlsFailed, match="internal error"):
            await open_dtls(target, INSECURE, 5)
        first.send(b"first still served")
        assert await first.recv(5) == b"first still served"
        first.close()

    run_async(main())
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_udp_dropped_total", reason="dtls: connection limit") == 1


def test_mutual_tls_requires_a_client_certificate(start_server, tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    pem = str(tmp_path / "server.pem")
    server = start_server(
        "--bind", "dtls://127.0.0.1:0", "--tls-cert", pem, "--tls-key", pem,
        "--tls-client-ca", str(tmp_path / "ca.pem"),
    )  # fmt: skip
    _, host, port = server.listener("dtls")
    target = Target("dtls", host, port)
    verified = TlsOptions(ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(DtlsFailed, match="handshake failed"):
        run_async(echoes(target, [b"no certificate"], verified))
    server.wait_for_log(r"DTLS handshake from .* failed: peer did not return a certificate")
    client_cert = ca.issue_cert("client@example.org")
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    ctx = client_context(verified)
    ctx.use_certificate_chain_file(str(tmp_path / "client.pem"))
    ctx.use_privatekey_file(str(tmp_path / "client.pem"))
    _, got = run_async(echoes(target, [b"with a certificate"], verified, context=ctx))
    assert got == [b"with a certificate"]


def test_sigterm_sends_close_notify_then_exits_0(start_server):
    server, target = dtls_server(start_server, "--graceful-timeout", "0.3")

    async def main() -> None:
        client = await open_dtls(target, INSECURE, 5)
        client.send(b"held open")
        assert await client.recv(5) == b"held open"
        server.signal(signal.SIGTERM)
        with pytest.raises(DtlsFailed, match="close_notify"):
            await client.recv(10)
        client.close()

    run_async(main())
    assert server.wait(10) == 0
    server.wait_for_log(r"closed: shutdown; in 9 B, out 9 B")


def test_a_client_restarting_from_the_same_port_replaces_its_session(start_server):
    """RFC 6347 §4.2.8: a new handshake (with a valid cookie) from the address of a live
    session is a client that rebooted, as a board does: the old session ends."""
    server, target = dtls_server(start_server)

    async def main() -> None:
        first = await open_dtls(target, INSECURE, 5)
        port = first.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        first.transport.close()  # type: ignore[union-attr]  # gone without close_notify
        second = await open_dtls(target, INSECURE, 5, local_port=port)
        second.send(b"after a reboot")
        assert await second.recv(5) == b"after a reboot"
        second.close()

    run_async(main())
    server.wait_for_log(r"connection #1 from .* closed: peer restarted")

    # A board that reboots mid-handshake: its half-done session must not swallow the new one.
    conn = raw_client()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.connect((target.host, target.port))
        cookie_exchange(sock, conn)  # a session now exists, mid-handshake
        sock.recv(65536)  # the server's flight; then this client is gone
    server.wait_for_log(r"connection #3 from")

    async def rebooted() -> bytes | None:
        client = await open_dtls(target, INSECURE, 3, local_port=port)
        client.send(b"rebooted mid-handshake")
        try:
            return await client.recv(5)
        finally:
            client.close()

    assert run_async(rebooted()) == b"rebooted mid-handshake"
    server.wait_for_log(r"connection #3 from .* closed: peer restarted")


def test_certificate_and_cipher_mistakes_are_one_line():
    assert_one_line_error(run_cli("serve", "--bind", "dtls://127.0.0.1:0"), 2, "--tls-cert")
    bad = run_cli(
        "serve", "--bind", "dtls://127.0.0.1:0", "--tls-self-signed", "--tls-ciphers", "NOPE-AES"
    )
    assert_one_line_error(bad, 2, "--tls-ciphers 'NOPE-AES': no cipher suite matches")
    missing = run_cli(
        "serve", "--bind", "dtls://127.0.0.1:0", "--tls-cert", "/nonexistent.pem",
        "--tls-key", "/nonexistent.pem",
    )  # fmt: skip
    assert_one_line_error(missing, 1, "cannot read --tls-cert /nonexistent.pem: no such file")
    impaired = run_cli("serve", "--bind", "dtls://127.0.0.1:0?delay=5ms", "--tls-self-signed")
    assert_one_line_error(impaired, 2, "dtls:// listeners take no impairments yet")


# -- the tools ------------------------------------------------------------------------------
def test_probe_client_and_bench_over_dtls(start_server):
    _, target = dtls_server(start_server)
    result = tool("probe", target.url, "--insecure", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert [s["name"] for s in report["steps"]] == [
        "handshake",
        "net-tools payloads",
        "1200-byte record",
        "Zephyr client pattern",
        "handshake under loss",
    ]
    assert "cookie exchange (HelloVerifyRequest)" in report["steps"][0]["detail"]
    assert "2 datagram(s) lost on purpose" in report["steps"][4]["detail"]
    data = os.urandom(100_000)
    piped = tool("client", target.url, "--insecure", stdin=data)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == data
    for mode in ("pingpong", "churn"):
        bench = tool(
            "bench", target.url, "--insecure", "--mode", mode, "-c", "4", "-d", "0.25", "-p", "1",
            "--json", "-",
        )  # fmt: skip
        summary = json.loads(bench.stdout)  # stdout is the JSON alone
        assert bench.returncode == 0, summary
        assert summary["requests"] > 0 and summary["mismatches"] == 0 and summary["errors"] == 0


def test_tools_name_what_fails_over_dtls_in_one_line(start_server):
    _, target = dtls_server(start_server)
    refused = tool("client", target.url, stdin=b"x")  # a self-signed certificate, verified
    assert refused.returncode == 2  # no session: unreachable, as on every scheme
    assert refused.stderr.decode().strip().splitlines() == [
        f"socket-echo: error: unreachable: {target.url}: "
        "handshake failed: certificate verify failed"
    ]
    nothing = tool("probe", "dtls://127.0.0.1:9", "--insecure", "--json")
    assert nothing.returncode == 2 and nothing.stdout == b""
    assert nothing.stderr.decode().strip().splitlines() == [
        "socket-echo: error: unreachable: dtls://127.0.0.1:9: refused: ICMP port unreachable "
        "(nothing listens there)"
    ]
    stream = run_cli("bench", target.url, "--insecure", "--mode", "stream")
    assert_one_line_error(stream, 2, "--mode stream over dtls://: use pingpong, churn")
    unverified = run_cli("bench", target.url, "-d", "1")
    assert_one_line_error(unverified, 2, "certificate verify failed")
    for command in ("client", "probe", "bench"):
        bad_name = run_cli(command, target.url, "--server-name", "a..b")
        assert_one_line_error(bad_name, 2, "'a..b' is not a host name or an address")


def test_workers_serve_dtls_sessions_from_the_credentials_made_before_the_fork(start_server):
    """--workers: each worker binds the DTLS port (SO_REUSEPORT hashes the 4-tuple, so a
    client's cookie exchange and session stay on one worker) with the context made once."""
    server = start_server(
        "--workers", "2", "--bind", "dtls://127.0.0.1:0", "--tls-self-signed", expect_listeners=2
    )  # both workers bound: the kernel's hash does not change under the sessions
    _, host, port = server.listener("dtls")
    target = Target("dtls", host, port)

    async def many() -> list[bytes]:  # generous: a loaded machine retransmits handshakes
        clients = [await open_dtls(target, INSECURE, 15) for _ in range(8)]
        for i, client in enumerate(clients):
            client.send(b"session %d" % i)
        got = [await client.recv(5) or b"" for client in clients]
        for client in clients:
            client.close()
        return got

    assert run_async(many(), 120) == [b"session %d" % i for i in range(8)]


def test_server_name_verifies_a_localhost_certificate_on_an_address(start_server, tmp_path):
    """net-tools' certificates are for "localhost" while a board has an address: the tools
    verify the certificate for --server-name (DTLS and QUIC alike) and name a mismatch."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    pem = str(tmp_path / "server.pem")
    server = start_server(
        "--bind", "dtls://127.0.0.1:0", "--bind", "quic://127.0.0.1:0", "--tls-cert", pem,
        "--tls-key", pem, expect_listeners=2,
    )  # fmt: skip
    ca_file = str(tmp_path / "ca.pem")
    for scheme in ("dtls", "quic"):
        _, host, port = server.listener(scheme)
        url = f"{scheme}://{host}:{port}"
        wrong = tool("client", url, "--ca", ca_file, "--timeout", "3", stdin=b"x")
        assert wrong.returncode == 2, wrong.stderr  # no handshake: unreachable
        assert b"127.0.0.1" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
        right = tool("client", url, "--ca", ca_file, "--server-name", "localhost", stdin=b"ok")
        assert (right.returncode, right.stdout) == (0, b"ok"), right.stderr


def test_a_malformed_client_hello_breaks_no_other_session(start_server):
    """A torn ClientHello is dropped and counted as such (no HelloVerifyRequest counted for
    it), and leaves an entry on OpenSSL's per-thread error queue: the sessions around it must
    read on (SSL_get_error() must not take that entry for theirs, cf. h2o#1448)."""
    server, target = dtls_server(start_server)
    torn = b"\x16\xfe\xfd" + bytes(8) + b"\x00\x05" + b"\x01garb"  # a ClientHello, torn

    async def main() -> list[bytes | None]:
        clients = [await open_dtls(target, INSECURE, 5) for _ in range(3)]
        got = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for client in clients:
                attacker.sendto(torn, (target.host, target.port))
                client.send(b"still here")
                got.append(await client.recv(5))
        for client in clients:
            client.close()
        return got

    assert run_async(main()) == [b"still here"] * 3
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_udp_dropped_total", reason="dtls: malformed ClientHello") == 3
    assert total(m, "socket_echo_connections_closed_total", reason="error") == 0
