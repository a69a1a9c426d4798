"""``quic://`` listeners: QUIC v1 echo on aioquic, for Zephyr's QUIC echo samples and net-tools.

Every stream's bytes go back on the same stream as they arrive (Zephyr's client sends the next
round without a FIN and waits for each echo); a FIN is mirrored after the last byte; any
number of streams per connection (up to ``--quic-max-streams`` at once) and of connections.
RFC 9221 datagrams are echoed when the peer advertises them. ALPN ``echo-quic`` by default
(``--quic-alpn`` replaces it); the certificate is the TLS listeners' (``--tls-cert``/``--tls-key``
or ``--tls-self-signed``).

Before any per-connection state exists, a datagram that would start a connection (a long-header
Initial for an unknown connection ID) passes the UDP guard (udp/guard.py: source port and
address rules, the per-prefix and global token buckets: handshakes per source prefix), the
connection cap and the descriptor-free table of tracked connections. ``--quic-retry`` validates
addresses with Retry first. A handshake that does not finish within ``--tls-handshake-timeout``
is closed; ``--idle-timeout`` is QUIC's own idle timeout. Each connection goes through the one
lifecycle of lifecycle.py (admission, reasons, counters, the open and close records).

Why the connection's stream limit is set through a private attribute: aioquic 1.7.2 has no
setting for it (its ``initial_max_streams_bidi`` is fixed at 128); the value is read when the
transport parameters are sent, so setting it right after the connection is made is enough.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from typing import Any, cast

from aioquic import tls
from aioquic._crypto import CryptoError
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography.x509 import load_pem_x509_certificates

from socket_echo.config import (
    DEFAULT_MAX_HANDSHAKES,
    DEFAULT_QUIC_ALPN,
    DEFAULT_QUIC_MAX_DATA,
    DEFAULT_QUIC_MAX_STREAM_DATA,
    DEFAULT_QUIC_MAX_STREAMS,
    ServerConfig,
)
from socket_echo.gates.tls import describe_error, report_failure
from socket_echo.lifecycle import (
    ERROR,
    HANDSHAKE_TIMEOUT,
    IDLE,
    PEER_CLOSED,
    Connection,
    ListenerContext,
)
from socket_echo.logs import log_event
from socket_echo.state import ServerState
from socket_echo.udp.guard import UdpGuard

MAX_DATAGRAM_FRAME = 65536


class QuicSetupError(Exception):
    """Certificate or key unusable for QUIC: one line, exit 1."""


@dataclasses.dataclass(frozen=True)
class QuicOptions:
    alpn: tuple[str, ...] = DEFAULT_QUIC_ALPN
    retry: bool = False
    max_streams: int = DEFAULT_QUIC_MAX_STREAMS
    max_data: int = DEFAULT_QUIC_MAX_DATA  # connection flow-control window, bytes
    max_stream_data: int = DEFAULT_QUIC_MAX_STREAM_DATA  # per-stream window, bytes
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0  # 0 = never
    client_ca: bytes | None = None  # --tls-client-ca's certificates (PEM): mutual TLS
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES  # in progress at once, per listener


def quic_options(cfg: ServerConfig) -> QuicOptions:
    """The QUIC listeners' options from the server's configuration; QuicSetupError when the
    client CA file holds no certificate."""
    client_ca = None
    if cfg.tls_client_ca:
        client_ca = read_client_ca(cfg.tls_client_ca)
    return QuicOptions(
        client_ca=client_ca,
        alpn=cfg.quic_alpn,
        retry=cfg.quic_retry,
        max_streams=cfg.quic_max_streams,
        max_data=cfg.quic_max_data,
        max_stream_data=cfg.quic_max_stream_data,
        handshake_timeout=cfg.tls_handshake_timeout,
        idle_timeout=cfg.idle_timeout,
        max_handshakes=cfg.max_handshakes,
    )


def configuration(
    options: QuicOptions,
    cert: str | None,
    key: str | None,
    self_signed: tuple[Any, Any] | None,
) -> QuicConfiguration:
    """The server side's QuicConfiguration; QuicSetupError when the files are unusable."""
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=list(options.alpn),
        idle_timeout=options.idle_timeout or 10.0**9,
        max_data=options.max_data,
        max_stream_data=options.max_stream_data,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME,
    )
    if self_signed is not None:
        config.certificate, config.private_key = self_signed
        return config
    try:
        config.load_cert_chain(cert or "", key)
    except (OSError, ValueError, TypeError) as exc:
        raise QuicSetupError(
            f"QUIC: cannot use --tls-cert {cert} / --tls-key {key}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    return config


def read_client_ca(path: str) -> bytes:
    """``--tls-client-ca`` read once, at start (not per handshake), and checked to hold at
    least one PEM certificate."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
        if not load_pem_x509_certificates(pem):
            raise ValueError("no certificate in it")
    except (OSError, ValueError) as exc:
        raise QuicSetupError(
            f"QUIC: cannot use --tls-client-ca {path}: {describe_error(exc)}"
        ) from None
    return pem


class AlertCertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


def require_client_certificates(quic: QuicConnection, cadata: bytes) -> None:
    """Mutual TLS on quic:// (``--tls-client-ca``), as tls:// and dtls:// have it.

    Why by hand: aioquic 1.7.2 can ask a client for its certificate (its TLS context's
    ``_request_client_certificate``, "for test purposes only"), but then takes an empty one
    and verifies none. So we ask, and when the client's Certificate message arrives (before
    its Finished: no stream data can be read yet) refuse one that is empty with
    certificate_required (RFC 8446 4.4.2.4) and one whose chain the CA did not sign with
    bad_certificate: the handshake fails with that alert, as OpenSSL's does on tls://.
    aioquic itself checks the CertificateVerify signature that proves the client holds the
    key. The TLS context is made when the first Initial is read (``_initialize``), hence
    the wrapper there. No session tickets are issued (QuicServer keeps none), so no client
    can resume its way past the request."""
    initialize = quic._initialize

    def initialize_and_ask(peer_cid: bytes) -> None:
        initialize(peer_cid)
        context = quic.tls
        context._request_client_certificate = True
        handle = context._server_handle_certificate

        def handle_and_verify(input_buf: Buffer) -> None:
            handle(input_buf)
            certificate = context._peer_certificate
            if certificate is None:
                raise AlertCertificateRequired("a client certificate is required")
            tls.verify_certificate(
                certificate=certificate, chain=context._peer_certificate_chain, cadata=cadata
            )

        context._server_handle_certificate = handle_and_verify  # type: ignore[method-assign]

    quic._initialize = initialize_and_ask  # type: ignore[method-assign]


class QuicLife(Connection):
    """One QUIC connection in the one lifecycle: the sweep, the drain and the metrics see it
    like any stream connection."""

    __slots__ = ("bytes_out", "protocol", "streams")

    def __init__(self, ctx: ListenerContext, peer: Any, protocol: QuicEcho) -> None:
        super().__init__(ctx, peer)
        self.protocol = protocol
        self.streams = 0
        self.bytes_out = 0

    def held(self) -> int:
        return 0  # aioquic holds unsent stream data within the peer's flow-control window

    def close(self, reason: str) -> None:
        self.give_reason(reason)
        self.closing = True
        self.protocol.close()

    def abort(self, reason: str) -> None:
        self.close(reason)


class QuicEcho(QuicConnectionProtocol):
    """Echoes every stream and datagram of one QUIC connection. Until its handshake is done it
    is a handshake (one of the listener's ``Slots``), not a connection: it holds no slot
    of the shared cap and is logged, if it fails, as a failed handshake, like TLS's."""

    def __init__(
        self, quic: QuicConnection, *, ctx: ListenerContext, server: EchoQuicServer, **kwargs: Any
    ) -> None:
        super().__init__(quic, **kwargs)
        self.ctx = ctx
        self.server = server
        self.peer: Any = None
        self.life: QuicLife | None = None
        self.seen: set[int] = set()
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.refused = False  # handshake done, but over the cap: counted as a drop
        self.in_handshake = False  # holds one of the listener's handshake slots

    def begin(self, peer: Any, handshake_timeout: float) -> None:
        """Its Initial decrypted and was let in: the handshake has this long to finish."""
        self.peer = peer
        self.in_handshake = True
        self.handshake_timer = self.ctx.loop.call_later(handshake_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self.handshake_timer = None
        self.timed_out = True
        self.close()

    def _handshake_over(self) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None
        if self.in_handshake:
            self.in_handshake = False
            self.server.handshaking.give()

    def _open(self) -> None:
        """The handshake is done: now a connection, admitted (or refused) by the shared cap."""
        self._handshake_over()
        life = QuicLife(self.ctx, self.peer, self)
        if not life.admit():
            # CONNECTION_REFUSED (0x2): over the cap, or out of descriptors' budget
            self.server.state.udp.dropped["quic: connection limit"] += 1
            self.refused = True
            self._quic.close(error_code=0x2, reason_phrase="connection limit")
            self.transmit()
            return
        self.life = life

    def _failed(self, event: ConnectionTerminated) -> None:
        """Terminated before its handshake was done: a failed handshake, named."""
        self._handshake_over()
        if self.peer is None or self.refused:
            return
        if self.timed_out:
            reason = HANDSHAKE_TIMEOUT
        else:
            reason = event.reason_phrase or f"error {event.error_code:#x}"
        report_failure(self.ctx, self.server.state.tls, self.peer, reason, kind="QUIC")

    def quic_event_received(self, event: QuicEvent) -> None:
        life = self.life
        if life is None:
            if isinstance(event, HandshakeCompleted):
                self._open()
            elif isinstance(event, ConnectionTerminated):
                self._failed(event)
            return
        if isinstance(event, StreamDataReceived):
            if event.stream_id not in self.seen:
                self.seen.add(event.stream_id)
                life.streams += 1
            life.bytes_in += len(event.data)
            life.bytes_out += len(event.data)
            self._quic.send_stream_data(event.stream_id, event.data, event.end_stream)
            if event.end_stream:
                self.seen.discard(event.stream_id)
            self.transmit()
        elif isinstance(event, DatagramFrameReceived):
            life.bytes_in += len(event.data)
            life.bytes_out += len(event.data)
            self._quic.send_datagram_frame(event.data)
            self.transmit()
        elif isinstance(event, StreamReset):
            self.seen.discard(event.stream_id)
            self._quic.reset_stream(event.stream_id, event.error_code)
            self.transmit()
        elif isinstance(event, ConnectionTerminated):
            if "idle" in (event.reason_phrase or "").lower():
                life.give_reason(IDLE)
            elif event.error_code == 0:  # NO_ERROR: a clean close (ours or the peer's)
                life.give_reason(PEER_CLOSED)
            else:
                life.give_reason(ERROR, event.reason_phrase or f"error {event.error_code:#x}")
            life.released(0)
            self.life = None


def initial_opens(data: bytes, cid_length: int) -> bool:
    """Whether the datagram's first packet, an Initial, decrypts with the Initial keys its
    destination connection ID derives (RFC 9001 5.2). Junk that merely looks like an Initial
    (right first byte, 1,200 bytes) fails here, before aioquic makes a connection for it:
    aioquic makes one for any such datagram and only then finds it cannot read it."""
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=cid_length)
        crypto = CryptoPair()
        version = header.version or 0  # a version aioquic supports: checked by the caller
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=version)
        crypto.decrypt_packet(data[: header.packet_length], buf.tell(), 0)
    except (ValueError, CryptoError, KeyError):
        return False
    return True


class EchoQuicServer(QuicServer):
    """aioquic's server, with the guard, the handshake bound, the cap and the lifecycle in
    front of new connections.

    What an Initial for an unknown connection ID passes, in order, before aioquic keeps any
    state for it: the UDP guard (per-source-prefix and global rates), a decryption check
    (:func:`initial_opens`), and the bound on handshakes in progress (``--max-handshakes``,
    apart from the shared connection cap, so a flood of handshakes that never finish cannot
    lock TCP clients out). The shared cap admits a connection when its handshake is done."""

    def __init__(
        self,
        *,
        ctx: ListenerContext,
        guard: UdpGuard,
        state: ServerState,
        options: QuicOptions,
        configuration: QuicConfiguration,
    ) -> None:
        self.ctx, self.guard, self.state, self.options = ctx, guard, state, options
        self.handshaking = state.tls.slots(options.max_handshakes)

        def create(quic: QuicConnection, **kwargs: Any) -> QuicEcho:
            quic._local_max_streams_bidi.value = options.max_streams  # see the docstring
            if options.client_ca is not None:
                require_client_certificates(quic, options.client_ca)
            return QuicEcho(quic, ctx=ctx, server=self, **kwargs)

        super().__init__(configuration=configuration, create_protocol=create, retry=options.retry)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        data = cast(bytes, data)
        cid_length = self._configuration.connection_id_length
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
        except ValueError:
            self.state.udp.dropped["quic: not a QUIC packet"] += 1
            return
        if header.destination_cid in self._protocols:
            super().datagram_received(data, addr)
            return
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version not in self._configuration.supported_versions
        ):
            super().datagram_received(data, addr)  # version negotiation; otherwise ignored
            return
        reason = self.guard.check(addr[0], addr[1], self._loop.time())
        if reason is not None:
            self.state.udp.dropped[f"quic: {reason}"] += 1
            return
        if self.ctx.draining:
            return
        if not initial_opens(data, cid_length):
            self.state.udp.dropped["quic: undecryptable initial"] += 1
            return
        if not self.handshaking.take():
            self.state.udp.dropped["quic: handshakes in progress"] += 1
            return
        known = len(self._protocols)
        super().datagram_received(data, addr)
        if len(self._protocols) == known:  # a Retry was sent, or nothing made: no handshake
            self.handshaking.give()
            return
        made = self._protocols.get(header.destination_cid)
        if made is None:  # made and already gone: nothing holds the slot
            self.handshaking.give()
            return
        cast(QuicEcho, made).begin(addr, self.options.handshake_timeout)

    def close_all(self) -> None:
        for protocol in set(self._protocols.values()):
            protocol.close()


async def serve_quic(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    ctx: ListenerContext,
    guard: UdpGuard,
    state: ServerState,
    options: QuicOptions,
    config: QuicConfiguration,
) -> EchoQuicServer:
    server: EchoQuicServer | None = None

    def factory() -> EchoQuicServer:
        nonlocal server
        server = EchoQuicServer(
            ctx=ctx, guard=guard, state=state, options=options, configuration=config
        )
        return server

    await loop.create_datagram_endpoint(factory, sock=sock)
    assert server is not None
    log_event(
        logging.DEBUG,
        "quic",
        f"QUIC on {ctx.listener}: ALPN {', '.join(options.alpn)}",
        listener=ctx.listener,
    )
    return server
