"""``--tls-client-ca`` on every secure listener kind: a client without a certificate, or with
one the CA did not sign, gets no echo, whether the server's own certificate comes from files
or from ``--tls-self-signed``; a client with a signed certificate is served."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from conftest import assert_one_line_error, exchange, run_cli
from test_dtls import echoes
from test_quic import EchoClient, client_config

from socket_echo.tools.connect.dtls import DtlsFailed, client_context
from socket_echo.tools.connect.quic import QuicFailed
from socket_echo.tools.connect.target import Target, TlsOptions


def own_certificate(pki, how: str) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    if how == "self-signed":
        return ("--tls-self-signed",)
    return ("--tls-cert", pki["server"], "--tls-key", pki["server"])


CERTIFICATES = ["files", "self-signed"]


def tls_echo(port: int, client: str | None) -> bytes:
    """What comes back for one message over TLS; b"" (or an SSL error) when refused."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if client:
        ctx.load_cert_chain(client)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            return exchange(sock, b"hello")  # TLS 1.3: the verdict comes after the handshake
    except (ssl.SSLError, ConnectionError):
        return b""


@pytest.mark.parametrize("how", CERTIFICATES)
def test_tls_requires_a_signed_client_certificate(start_server, pki, how, loop_name):
    server = start_server(
        "--loop", loop_name, "--bind", "tls://127.0.0.1:0", *own_certificate(pki, how),
        "--tls-client-ca", pki["ca"],
    )  # fmt: skip
    _, _, port = server.listener("tls")
    assert tls_echo(port, None) == b""
    assert tls_echo(port, pki["stranger"]) == b""
    assert tls_echo(port, pki["client"]) == b"hello"
    server.wait_for_log(r"TLS: cipher suites .*client certificates required")


def quic_echo(port: int, client: str | None) -> bytes | str:
    """One stream's echo over QUIC, or why the connection ended without one."""
    from aioquic.asyncio.client import connect

    config = client_config()
    if client:
        config.load_cert_chain(
            client.replace(".pem", "-cert.pem"), client.replace(".pem", "-key.pem")
        )

    async def main() -> bytes | str:
        try:
            async with connect(
                "127.0.0.1", port, configuration=config, create_protocol=EchoClient
            ) as conn:
                conn.send(0, b"hello", end=True)
                await conn.until(lambda: 0 in conn.ended)
                return bytes(conn.got[0])
        except (QuicFailed, ConnectionError) as exc:
            return str(exc) or type(exc).__name__

    return asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("how", CERTIFICATES)
def test_quic_requires_a_signed_client_certificate(start_server, pki, how):
    server = start_server(
        "--bind", "quic://127.0.0.1:0", *own_certificate(pki, how), "--tls-client-ca", pki["ca"]
    )
    _, _, port = server.listener("quic")
    refused = quic_echo(port, None)
    assert refused != b"hello"
    assert "0x174" in str(refused), refused  # CRYPTO_ERROR + certificate_required (116)
    stranger = quic_echo(port, pki["stranger"])
    assert stranger != b"hello"
    assert "0x12a" in str(stranger), stranger  # CRYPTO_ERROR + bad_certificate (42)
    assert quic_echo(port, pki["client"]) == b"hello"
    server.wait_for_log(r"QUIC: ALPN echo-quic, client certificates required")


@pytest.mark.parametrize("how", CERTIFICATES)
def test_dtls_requires_a_signed_client_certificate(start_server, pki, how):
    server = start_server(
        "--bind", "dtls://127.0.0.1:0", *own_certificate(pki, how), "--tls-client-ca", pki["ca"]
    )
    _, host, port = server.listener("dtls")
    target = Target("dtls", host, port)
    insecure = TlsOptions(insecure=True)
    with pytest.raises(DtlsFailed, match="handshake failed"):
        asyncio.run(asyncio.wait_for(echoes(target, [b"no certificate"], insecure), 30))
    ctx = client_context(insecure)
    ctx.use_certificate_chain_file(pki["client"])
    ctx.use_privatekey_file(pki["client"])
    _, got = asyncio.run(asyncio.wait_for(echoes(target, [b"signed"], insecure, context=ctx), 30))
    assert got == [b"signed"]


@pytest.mark.parametrize("scheme", ["tls", "quic", "dtls"])
@pytest.mark.parametrize("how", CERTIFICATES)
def test_an_unreadable_client_ca_is_one_line_before_anything_starts(pki, tmp_path, scheme, how):
    missing = str(tmp_path / "nonexistent.pem")
    result = run_cli(
        "--bind", f"{scheme}://127.0.0.1:0", *own_certificate(pki, how),
        "--tls-client-ca", missing,
    )  # fmt: skip
    assert_one_line_error(result, 1, f"cannot read --tls-client-ca {missing}: no such file")


def test_a_missing_certificate_file_is_named_with_its_flag(tmp_path):
    missing = str(tmp_path / "nonexistent.pem")
    result = run_cli("--bind", "tls://127.0.0.1:0", "--tls-cert", missing, "--tls-key", missing)
    assert_one_line_error(result, 1, f"cannot read --tls-cert {missing}: no such file")


def test_a_client_ca_without_a_certificate_in_it_is_refused_for_quic(pki, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    result = run_cli(
        "--bind", "quic://127.0.0.1:0", "--tls-self-signed", "--tls-client-ca", str(junk)
    )
    assert_one_line_error(result, 1, "--tls-client-ca")
