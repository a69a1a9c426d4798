"""TLS listeners: the handshake, its failures named, then the ordinary echo protocol.

Why not ``create_server(ssl=...)``: there a failed handshake never reaches the application
(asyncio and uvloop report SSL errors only in debug mode; the protocol is never told), so
nothing could log the reason. Our accept reader hands each raw socket over instead:

- stdlib loop: the socket becomes a plain transport whose reading is paused at once (no byte
  of the ClientHello is lost), ``loop.start_tls()`` runs the handshake with a timeout and raises
  the real reason on failure, and only a finished handshake hands the transport to
  :class:`EchoProtocol` (:class:`TlsGate`);
- uvloop: its ``start_tls()`` hung handshakes here (cf. MagicStack/uvloop#707), so uvloop does
  the TLS itself via ``connect_accepted_socket(ssl=...)``, which raises the failure to us just
  the same (:func:`native_handshake`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any, cast

from socket_echo.config import TLS_CIPHER_PRESETS, ConfigError
from socket_echo.lifecycle import HANDSHAKE_TIMEOUT, ListenerContext, format_peer, peer_of
from socket_echo.logs import log_event
from socket_echo.state import TlsStats

MIN_VERSION = ssl.TLSVersion.TLSv1_2
TOO_MANY_HANDSHAKES = "too many handshakes in progress"  # --max-handshakes: reset at once


class TlsSetupError(Exception):
    """Certificate or key missing, unreadable or not matching: one line, exit 1."""


def new_context() -> ssl.SSLContext:
    """A server context with our floor: TLS 1.2 set explicitly, whatever the system default,
    and no renegotiation: a client could otherwise make the server redo the expensive side of
    a handshake at will on one connection. OpenSSL 3 refuses client-initiated renegotiation
    by default already; OpenSSL 1.1.1 builds do not. TLS 1.3 has none."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def apply_ciphers(ctx: ssl.SSLContext, choice: str) -> list[str]:
    """``--tls-ciphers``: a preset of config.TLS_CIPHER_PRESETS or an OpenSSL cipher string;
    returns the suites in force. ConfigError (one line, exit 2) when nothing matches."""
    try:
        ctx.set_ciphers(TLS_CIPHER_PRESETS.get(choice, choice))
    except ssl.SSLError:
        presets = ", ".join(TLS_CIPHER_PRESETS)
        raise ConfigError(
            f"--tls-ciphers {choice!r}: no cipher suite matches (use {presets} or an OpenSSL "
            "cipher string)"
        ) from None
    return [c["name"] for c in ctx.get_ciphers()]


def server_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = new_context()
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(exc):
            reason = "the key does not match the certificate"
        raise TlsSetupError(
            f"TLS: cannot use --tls-cert {cert} / --tls-key {key}: {reason}"
        ) from None
    except OSError as exc:  # (SSLError is one, caught above) checked by flag before: a race
        raise TlsSetupError(
            f"TLS: cannot read --tls-cert {cert} / --tls-key {key}: {describe_error(exc)}"
        ) from None
    if client_ca:
        require_client_certificates(ctx, client_ca)
    return ctx


def require_client_certificates(ctx: ssl.SSLContext, client_ca: str) -> None:
    """Mutual TLS (``--tls-client-ca``): a client certificate signed by this CA is required,
    whatever the server's own certificate came from (files or ``--tls-self-signed``)."""
    try:
        ctx.load_verify_locations(client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"TLS: cannot use --tls-client-ca {client_ca}: {describe_error(exc)}"
        ) from None
    ctx.verify_mode = ssl.CERT_REQUIRED


def describe_error(exc: BaseException) -> str:
    """An OSError's or SSLError's cause in words: "no such file", not "[Errno 2] ..."."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc)


def self_signed_context(pair: tuple[Any, Any] | None = None) -> tuple[ssl.SSLContext, str]:
    """A certificate for localhost made at start, in memory (the PEM touches a private temp
    file only long enough for OpenSSL to load it). Returns (context, SHA-256 fingerprint).
    ``pair``: the (certificate, key) of :func:`self_signed_pair` to use (QUIC shares it)."""
    import tempfile  # here, as cryptography: a server without a self-signed certificate

    from cryptography.hazmat.primitives import hashes, serialization

    cert, key = pair or self_signed_pair()
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, path = tempfile.mkstemp(suffix=".pem")  # mode 0600
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx = new_context()
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return ctx, fingerprint


def self_signed_pair() -> tuple[Any, Any]:
    """(certificate, private key) for localhost, 127.0.0.1 and ::1: EC P-256, 30 days."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "taking longer" in str(exc):
        return HANDSHAKE_TIMEOUT
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")
    if isinstance(exc, (ConnectionError, EOFError)):
        return "peer closed during the handshake"
    return type(exc).__name__


def report_failure(
    ctx: ListenerContext, stats: TlsStats, peer: Any, reason: str, kind: str = "TLS"
) -> None:
    stats.handshake_failures[reason] += 1
    log_event(
        logging.INFO if ctx.access_log else logging.DEBUG,
        "tls_failed",
        f"{kind} handshake from {format_peer(peer)} failed: {reason}",
        listener=ctx.listener,
        peer=format_peer(peer),
        reason=reason,
    )


async def native_handshake(
    ctx: ListenerContext,
    sock: Any,
    sslcontext: ssl.SSLContext,
    timeout: float,
    stats: TlsStats,
    peer: Any = None,
) -> None:
    """uvloop: TLS by uvloop itself on an accepted socket (its start_tls() hangs handshakes
    here, cf. MagicStack/uvloop#707); a failed handshake raises here, so it is named too."""
    shown = peer if peer is not None else peer_of(sock)

    def echo() -> asyncio.Protocol:
        return ctx.new_echo(peer)

    try:
        await ctx.loop.connect_accepted_socket(
            echo, sock, ssl=sslcontext, ssl_handshake_timeout=timeout
        )
    except (OSError, EOFError, asyncio.TimeoutError, ssl.SSLError) as exc:
        sock.close()
        report_failure(ctx, stats, shown, failure_reason(exc))


class TlsGate(asyncio.Protocol):
    """Holds a new TCP connection (reading paused) until its TLS handshake is done. Used on
    the stdlib loop; uvloop runs TLS on its own server (see server.py)."""

    def __init__(
        self,
        ctx: ListenerContext,
        sslcontext: ssl.SSLContext,
        handshake_timeout: float,
        stats: TlsStats,
        peer: Any = None,
    ) -> None:
        self.ctx = ctx
        self.peer = peer  # the client a PROXY header named (tls+proxy), else None
        self.sslcontext = sslcontext
        self.handshake_timeout = handshake_timeout
        self.stats = stats
        self.task: asyncio.Task[None] | None = None
        # Data (and EOF) the TLS layer may deliver between the end of the handshake and the
        # hand-over to the echo protocol: kept, then passed on in order.
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        tcp.pause_reading()  # the ClientHello waits in the kernel for start_tls
        self.task = self.ctx.loop.create_task(self._handshake(tcp))

    async def _handshake(self, tcp: asyncio.Transport) -> None:
        peer = tcp.get_extra_info("peername")
        try:
            tls = await self.ctx.loop.start_tls(
                tcp,
                self,
                self.sslcontext,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, EOFError, asyncio.TimeoutError, ssl.SSLError) as exc:
            self._fail(tcp, peer, failure_reason(exc))
            return
        if tls is None:  # closed meanwhile
            return
        echo = self.ctx.new_echo(self.peer)
        tls.set_protocol(echo)
        echo.connection_made(tls)
        for chunk in self.early:
            echo.data_received(chunk)
        if self.early_eof:
            echo.eof_received()

    def _fail(self, tcp: asyncio.Transport, peer: Any, reason: str) -> None:
        tcp.abort()
        report_failure(self.ctx, self.stats, peer, reason)

    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def eof_received(self) -> None:
        self.early_eof = True  # passed on after the hand-over; None: no stderr warning (TLS)

    def connection_lost(self, exc: Exception | None) -> None:
        pass
