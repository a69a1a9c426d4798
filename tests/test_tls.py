"""TLS listeners: echo, mutual TLS, failed handshakes named in the log, bad files at start."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme
from conftest import assert_one_line_error, exchange, recv_until_eof, run_cli, wait_until
from tools_helpers import tool


def client_context(pki, cert: str | None = None) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        ctx.load_cert_chain(cert)
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def start_tls(start_server, pki, *extra: str, loop_flags=()):  # type: ignore[no-untyped-def]
    return start_server(
        *loop_flags,
        "--bind",
        "tls://127.0.0.1:0",
        "--tls-cert",
        pki["cert"],
        "--tls-key",
        pki["key"],
        *extra,
    )


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def test_tls_echo_on_both_loops(start_server, pki, loop_name):
    server = start_tls(start_server, pki, loop_flags=("--loop", loop_name))
    _, _, port = server.listener("tls")
    data = os.urandom(2 << 20)
    with tls_connect(port, client_context(pki)) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert exchange(sock, data) == data
    server.wait_for_log(r"connection #1 from 127\.0\.0\.1:\d+ closed")
    result = tool("probe", f"tls://127.0.0.1:{port}", "--ca", pki["ca"], "--json")
    assert result.returncode == 0, result.stdout
    # Only formatted log lines: the stdlib loop's "returning true from eof_received() has no
    # effect when using ssl" once reached stderr bare, on every TLS connection.
    server.wait_for_log(r"connection #\d+ from .* closed")
    stray = [line for line in server.lines if not LOG_LINE.match(line)]
    assert stray == []


def test_minimum_version_is_tls_1_2(start_server, pki, loop_name):
    """A client that offers only TLS 1.1 (security level lowered so OpenSSL will send it) is
    refused by the server, which names the reason: the refusal is the server's, not ours."""
    server = start_tls(start_server, pki, loop_flags=("--loop", loop_name))
    _, _, port = server.listener("tls")
    ctx = client_context(pki)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(port, ctx).close()
    server.wait_for_log(r"TLS handshake from .* failed: unsupported protocol")


def test_plain_text_and_garbage_fail_with_a_named_reason_and_the_server_goes_on(
    start_server, pki, loop_name
):
    server = start_tls(start_server, pki, loop_flags=("--loop", loop_name))
    _, _, port = server.listener("tls")
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(300), b"hello\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(junk)
            got = b""
            with contextlib.suppress(ConnectionResetError):
                got = recv_until_eof(raw)  # ends: EOF or reset, never a hang
            # nothing of it echoed: at most a TLS alert record (content type 21)
            assert got == b"" or (got[0] == 21 and junk not in got), got[:40]
    failures = server.wait_for_log(r"TLS handshake from 127\.0\.0\.1:\d+ failed: (.+)$")
    assert failures.group(1)
    wait_until(
        lambda: len(re.findall(r"TLS handshake from .* failed", server.log)) >= 3,
        10,
        "a line per failed handshake",
    )
    assert len(re.findall(r"TLS handshake from .* failed", server.log)) == 3
    with tls_connect(port, client_context(pki)) as sock:  # the server goes on
        assert exchange(sock, b"still fine") == b"still fine"


def test_handshake_timeout(start_server, pki, loop_name):
    server = start_tls(
        start_server, pki, "--tls-handshake-timeout", "0.5", loop_flags=("--loop", loop_name)
    )
    _, _, port = server.listener("tls")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        started = time.monotonic()
        assert recv_until_eof(raw) == b""  # closed by the server, we sent nothing
        assert time.monotonic() - started < 5
    server.wait_for_log(r"failed: handshake timeout")


def test_mutual_tls_requires_a_trusted_client_certificate(start_server, pki, loop_name):
    server = start_tls(
        start_server, pki, "--tls-client-ca", pki["ca"], loop_flags=("--loop", loop_name)
    )
    _, _, port = server.listener("tls")
    with tls_connect(port, client_context(pki, pki["client"])) as sock:
        assert exchange(sock, b"with a certificate") == b"with a certificate"
    for cert in (None, pki["stranger"]):
        try:
            with tls_connect(port, client_context(pki, cert)) as sock:
                sock.sendall(b"x")  # TLS 1.3: the server's verdict arrives after the handshake
                assert sock.recv(10) == b""
        except (ssl.SSLError, ConnectionError):
            pass
    server.wait_for_log(r"failed: .*(certificate|cert)")


def test_self_signed_prints_its_fingerprint(start_server, loop_name):
    server = start_server("--loop", loop_name, "--bind", "tls://127.0.0.1:0", "--tls-self-signed")
    m = server.wait_for_log(r"SHA-256 ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})")
    _, _, port = server.listener("tls")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with tls_connect(port, ctx) as sock:
        der = sock.getpeercert(binary_form=True)
        import hashlib

        assert hashlib.sha256(der).hexdigest().upper() == m.group(1).replace(":", "")
        assert exchange(sock, b"quick try") == b"quick try"


@pytest.mark.parametrize(
    "which, words",
    [
        ("missing", ["no such file"]),
        ("mismatch", ["does not match"]),
        ("garbage", ["cannot use"]),
    ],
)
def test_bad_certificate_files_are_one_line_and_exit_1(pki, tmp_path, which, words):
    cert, key = pki["cert"], pki["key"]
    if which == "missing":
        cert = str(tmp_path / "nope.pem")
    elif which == "mismatch":
        key = str(tmp_path / "other-key.pem")
        trustme.CA().issue_cert("x.example").private_key_pem.write_to_path(key)
    else:
        (tmp_path / "junk.pem").write_text("not a certificate")
        cert = str(tmp_path / "junk.pem")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "socket_echo",
            "--bind",
            "tls://127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr


def test_tls_listener_without_certificate_is_bad_usage():
    assert_one_line_error(run_cli("--bind", "tls://127.0.0.1:0"), 2, "--tls-cert")


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="openssl not installed")
def test_openssl_s_client_gets_its_echo(start_server, pki):
    import select

    server = start_tls(start_server, pki)
    _, _, port = server.listener("tls")
    proc = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            pki["ca"],
            "-verify_return_error",
            "-quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"hello from openssl\n")
        proc.stdin.flush()
        got = b""
        deadline = time.monotonic() + 10
        while b"hello from openssl\n" not in got and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                got += os.read(proc.stdout.fileno(), 4096)
        assert b"hello from openssl\n" in got
    finally:
        proc.kill()
        proc.wait(5)


def pump_handshake(
    raw: socket.socket, obj: ssl.SSLObject, inc: ssl.MemoryBIO, out: ssl.MemoryBIO
) -> None:
    while True:
        try:
            obj.do_handshake()
            raw.sendall(out.read())
            return
        except ssl.SSLWantReadError:
            raw.sendall(out.read())
            data = raw.recv(65536)
            assert data, "server closed during the handshake"
            inc.write(data)


@pytest.mark.parametrize("version", [1, 2])
def test_tls_behind_proxy_header_in_the_same_segment_as_the_client_hello(
    start_server, pki, loop_name, version
):
    from socket_echo.gates.proxy import build_v1, build_v2

    server = start_server(
        "--loop",
        loop_name,
        "--bind",
        "tls+proxy://127.0.0.1:0",
        "--tls-cert",
        pki["cert"],
        "--tls-key",
        pki["key"],
    )
    _, host, port = server.listener("tls+proxy")
    src, dst = ("198.51.100.9", 40000 + version), ("192.0.2.1", 4443)
    header = build_v1(src, dst) if version == 1 else build_v2(src, dst)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(pki).wrap_bio(inc, out, server_hostname="127.0.0.1")
    with socket.create_connection((host, port), timeout=10) as raw:
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        raw.sendall(header + out.read())  # PROXY header and ClientHello in one send
        pump_handshake(raw, obj, inc, out)
        obj.write(b"through the proxy")
        raw.sendall(out.read())
        got = b""
        while len(got) < 17:
            try:
                got += obj.read(100)
            except ssl.SSLWantReadError:
                inc.write(raw.recv(65536))
        assert got == b"through the proxy"
    server.wait_for_log(rf"connection #1 from 198\.51\.100\.9:{40000 + version} closed")


def test_tls_proxy_listener_rejects_a_missing_header(start_server, pki):
    server = start_server(
        "--bind", "tls+proxy://127.0.0.1:0", "--tls-cert", pki["cert"], "--tls-key", pki["key"]
    )
    _, _, port = server.listener("tls+proxy")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(port, client_context(pki)).close()  # a ClientHello is no PROXY header
    server.wait_for_log(r"PROXY header from .* rejected: no PROXY protocol header")


def test_server_contexts_refuse_renegotiation_whatever_the_openssl(pki):
    """OpenSSL 3 refuses client renegotiation by default, 1.1.1 does not: the flag is ours
    (the behaviour itself is tested with openssl s_client in test_abuse.py)."""
    from socket_echo.gates.tls import self_signed_context, server_context

    for ctx in (server_context(pki["cert"], pki["key"], None), self_signed_context()[0]):
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# -- --tls-ciphers: the suites Zephyr's mbedTLS clients offer -------------------------------


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory):  # type: ignore[no-untyped-def]
    """An RSA certificate, as net-tools' echo-apps-cert.pem is: RSA key exchange needs one."""
    d = tmp_path_factory.mktemp("rsa")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    files = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    return {k: str(v) for k, v in files.items()}


def mbedtls_echo(port: int, suite: str, payload: bytes, wait: float = 10.0) -> bytes | None:
    """The echo an mbedTLS client offering only ``suite`` gets (tests/mbedtls_client.py, a
    process of its own), or None when its handshake fails (or hangs: a known python-mbedtls
    behaviour after an alert)."""
    script = os.path.join(os.path.dirname(__file__), "mbedtls_client.py")
    try:
        done = subprocess.run(
            [sys.executable, script, str(port), suite, payload.hex()],
            capture_output=True,
            text=True,
            timeout=wait,
        )
    except subprocess.TimeoutExpired:
        return None
    return bytes.fromhex(done.stdout.strip()) if done.returncode == 0 else None


RSA_SUITE = "TLS-RSA-WITH-AES-128-CBC-SHA256"


def test_secure_preset_is_pythons_forward_secret_default():
    from socket_echo.config import TLS_CIPHER_PRESETS
    from socket_echo.gates.tls import apply_ciphers

    default = [c["name"] for c in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert apply_ciphers(ctx, "secure") == default
    assert all("DHE" in n or n.startswith("TLS_") for n in default)  # forward secrecy only
    compat = apply_ciphers(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "compat")
    assert {"AES128-SHA256", "AES128-GCM-SHA256"} <= set(compat) and set(default) < set(compat)
    assert "compat" in TLS_CIPHER_PRESETS


def test_mbedtls_rsa_key_exchange_needs_compat(start_server, rsa_pki):
    flags = ("--tls-cert", rsa_pki["cert"], "--tls-key", rsa_pki["key"])
    secure = start_server("--bind", "tls://127.0.0.1:0", *flags)
    _, _, port = secure.listener("tls")
    assert mbedtls_echo(port, RSA_SUITE, b"refused", wait=2.0) is None
    secure.wait_for_log(r"TLS handshake from .* failed: no shared cipher")
    compat = start_server("--bind", "tls://127.0.0.1:0", *flags, "--tls-ciphers", "compat")
    compat.wait_for_log(r"TLS: cipher suites \(--tls-ciphers compat\): .*AES128-SHA256")
    _, _, port = compat.listener("tls")
    payload = bytes(range(256)) * 8
    assert mbedtls_echo(port, RSA_SUITE, payload) == payload


def test_a_cipher_string_that_matches_nothing_is_one_line():
    result = run_cli(
        "serve", "--bind", "tls://127.0.0.1:0", "--tls-self-signed", "--tls-ciphers", "NOPE-AES"
    )
    assert_one_line_error(result, 2, "--tls-ciphers 'NOPE-AES': no cipher suite matches")


def half_hellos(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each send half a real ClientHello and then nothing: handshakes
    that hold the server's TLS state until its handshake timeout."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    out, into = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        ctx.wrap_bio(into, out, server_hostname="localhost").do_handshake()
    hello = out.read()
    socks = []
    for _ in range(n):
        try:  # over the bound the reset can come while connect() returns, or at the send
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionResetError:
            continue
        with contextlib.suppress(OSError):
            sock.sendall(hello[: len(hello) // 2])
        socks.append(sock)
    return socks


def test_handshakes_in_progress_are_bounded_and_a_client_is_served_after(
    start_server, pki, loop_name
):
    """60 handshakes that never finish against --max-handshakes 20: 20 are held (the gauge
    says so), 40 are reset at once and counted; once the 20 time out a client is served."""
    from conftest import poll_scrape, total

    server = start_tls(
        start_server, pki, "--max-handshakes", "20", "--tls-handshake-timeout", "1",
        "--metrics", "127.0.0.1:0", loop_flags=("--loop", loop_name),
    )  # fmt: skip
    _, _, port = server.listener("tls")
    socks = half_hellos(port, 60)
    failures = "socket_echo_tls_handshake_failures_total"
    over = "too many handshakes in progress"
    m = poll_scrape(server, lambda m: total(m, failures, reason=over) >= 40)
    assert total(m, failures, reason=over) == 40
    assert total(m, "socket_echo_handshakes_in_progress") == 20
    m = poll_scrape(server, lambda m: total(m, "socket_echo_handshakes_in_progress") == 0)
    assert total(m, "socket_echo_handshakes_in_progress") == 0
    assert total(m, failures, reason="handshake timeout") == 20
    for sock in socks:
        sock.close()
    with tls_connect(port, client_context(pki)) as sock:
        assert exchange(sock, b"after the flood") == b"after the flood"


def test_a_flood_of_handshakes_costs_the_bounds_memory_not_the_floods(start_server, pki, loop_name):
    """1,500 handshakes that never finish at once: the server holds at most the default
    --max-handshakes of them (a stdlib-loop handshake holds ~300 KiB), so its memory grows
    by the bound's worth, not 1,500 handshakes' (about 450 MiB on the stdlib loop before)."""
    import psutil
    from conftest import poll_scrape, total

    server = start_tls(
        start_server, pki, "--tls-handshake-timeout", "2", "--metrics", "127.0.0.1:0",
        "--no-access-log", loop_flags=("--loop", loop_name),
    )  # fmt: skip
    _, _, port = server.listener("tls")
    proc = psutil.Process(server.pid)
    before = proc.memory_info().rss
    socks = half_hellos(port, 1500)
    poll_scrape(server, lambda m: total(m, "socket_echo_handshakes_in_progress") == 256)
    peak = proc.memory_info().rss
    m = poll_scrape(server, lambda m: total(m, "socket_echo_handshakes_in_progress") == 0)
    for sock in socks:
        sock.close()
    print(f"{loop_name}: RSS {before >> 20} -> {peak >> 20} MiB with 1,500 handshakes waiting")
    assert total(m, "socket_echo_handshakes_in_progress") == 0
    assert peak - before < 112 << 20


def test_tls_at_the_smallest_max_buffer_still_echoes(start_server, loop_name, tmp_path):
    """--max-buffer's floor is one TLS record (16 KiB): below ~1000 bytes uvloop's TLS
    transport stopped the echo altogether, so smaller values are refused."""
    server = start_server(
        "--loop", loop_name, "--bind", "tls://127.0.0.1:0", "--tls-self-signed",
        "--max-buffer", "16KiB",
    )  # fmt: skip
    _, _, port = server.listener("tls")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        data = os.urandom(1 << 20)
        assert exchange(sock, data) == data
    assert_one_line_error(run_cli("--max-buffer", "1000"), 2, "16 KiB and 1 GiB")
