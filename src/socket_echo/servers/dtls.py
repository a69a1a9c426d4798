"""``dtls://`` listeners: DTLS 1.2 echo on pyOpenSSL, the peer of Zephyr's echo_server and
echo_client built with ``overlay-tls.conf`` (UDP 4242) and of net-tools' ``dtls-client``.

Each application record comes back as one record, in one datagram. The order of work for a
datagram from a source without a session, cheapest first, so that a forged source costs
nothing that outlives its datagram:

1. the UDP guard (udp/guard.py): the source port and address rules, the per-prefix and global
   token buckets (handshakes per source prefix);
2. anything but a plaintext ClientHello is dropped without parsing;
3. a stateless cookie exchange (RFC 6347 §4.2.1): ``DTLSv1_listen`` on a throw-away SSL object
   answers a HelloVerifyRequest whose cookie is an HMAC of the source address and port under a
   secret that rotates every ``DTLS_COOKIE_LIFETIME`` (the previous secret is still accepted);
   nothing is kept;
4. a ClientHello whose cookie verifies is admitted through the one lifecycle
   (lifecycle.py: the connection cap, draining, counters, the open record); over the cap the
   client gets a fatal alert and nothing is kept.

A session then runs its handshake with OpenSSL's retransmission timer and
``--tls-handshake-timeout``; ``--idle-timeout`` comes from the table's sweep. Closing sends a
close_notify (the sweep, the drain, or the peer's own close_notify answered). A ClientHello
with a valid cookie from the address of a session is a client that restarted
(RFC 6347 §4.2.8), even mid-handshake: once its cookie verifies, the old session ends and the
new one starts; a late or duplicated copy of the session's own ClientHello (the same random)
is not a restart. Established sessions' records
are not rate-limited by the guard: their address was proven by the cookie.

Certificates, ``--tls-client-ca`` (mutual TLS) and ``--tls-ciphers`` are the TLS listeners'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from OpenSSL import SSL, crypto

from socket_echo.config import (
    DTLS_MTU,
    TLS_CIPHER_PRESETS,
    ConfigError,
    ServerConfig,
)
from socket_echo.dtls_wire import (
    DTLS1_2_VERSION,
    Endpoint,
    alert_record,
    describe,
    hello_random,
    is_client_hello,
)
from socket_echo.gates.tls import report_failure
from socket_echo.lifecycle import (
    ERROR,
    HANDSHAKE_TIMEOUT,
    PEER_CLOSED,
    Connection,
    ListenerContext,
)
from socket_echo.logs import log_event
from socket_echo.state import ServerState
from socket_echo.udp.guard import UdpGuard

INTERNAL_ERROR = 80  # the alert a client over the cap gets
RESTARTED = "peer restarted"  # a new handshake from the address of a live session


class DtlsSetupError(Exception):
    """Certificate, key or client CA unusable: one line, exit 1."""


@dataclasses.dataclass(frozen=True)
class DtlsOptions:
    handshake_timeout: float = 10.0
    mtu: int = DTLS_MTU


def dtls_options(cfg: ServerConfig) -> DtlsOptions:
    return DtlsOptions(handshake_timeout=cfg.tls_handshake_timeout)


class CookieJar:
    """Stateless HelloVerifyRequest cookies: HMAC-SHA256(secret, source address and port),
    16 bytes. The secret rotates every ``lifetime`` seconds; a cookie made under the previous
    one still verifies, so a client between its two ClientHellos is never caught out."""

    def __init__(self, lifetime: float, clock: Any) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self.secrets = [os.urandom(32), os.urandom(32)]  # current, previous
        self.rotated = clock()

    def _rotate(self) -> None:
        now = self.clock()
        if now - self.rotated >= self.lifetime:
            self.secrets = [os.urandom(32), self.secrets[0]]
            self.rotated = now

    @staticmethod
    def _mac(secret: bytes, peer: bytes) -> bytes:
        return hmac.new(secret, peer, hashlib.sha256).digest()[:16]

    def generate(self, conn: SSL.Connection) -> bytes:
        self._rotate()
        return self._mac(self.secrets[0], conn.get_app_data())

    def verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        self._rotate()
        peer = conn.get_app_data()
        return any(hmac.compare_digest(self._mac(s, peer), cookie) for s in self.secrets)


def peer_key(addr: Any) -> bytes:
    """What a cookie is bound to: the source address and port."""
    return f"{addr[0]}|{addr[1]}".encode()


def cipher_string(choice: str) -> str:
    return TLS_CIPHER_PRESETS.get(choice, choice)


def dtls_context(
    cert: Any,
    key: Any,
    ciphers: str,
    client_ca: str | None,
    cookies: CookieJar,
) -> SSL.Context:
    """The listener's context. ``cert``/``key``: file names, or the cryptography objects of
    a self-signed pair. DtlsSetupError for unusable files, ConfigError for a cipher string
    that matches nothing."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_RENEGOTIATION)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # an idle session keeps no record buffers
    try:
        if isinstance(cert, str):
            ctx.use_certificate_chain_file(cert)
            ctx.use_privatekey_file(key)
        else:
            ctx.use_certificate(crypto.X509.from_cryptography(cert))
            ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise DtlsSetupError(
            f"DTLS: cannot use --tls-cert {cert} / --tls-key {key}: {describe(exc)}"
        ) from None
    try:
        ctx.set_cipher_list(cipher_string(ciphers).encode())
    except SSL.Error:
        raise ConfigError(
            f"--tls-ciphers {ciphers!r}: no DTLS cipher suite matches "
            f"(use {', '.join(TLS_CIPHER_PRESETS)} or an OpenSSL cipher string)"
        ) from None
    if client_ca:
        try:
            ctx.load_verify_locations(client_ca)
        except SSL.Error as exc:
            raise DtlsSetupError(
                f"DTLS: cannot use --tls-client-ca {client_ca}: {describe(exc)}"
            ) from None
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_cookie_generate_callback(cookies.generate)
    ctx.set_cookie_verify_callback(cookies.verify)
    return ctx


def suites(ctx: SSL.Context) -> list[str]:
    """The DTLS 1.2 suites a context offers (TLS 1.3 names left out: DTLS 1.3 is not offered)."""
    return [n for n in SSL.Connection(ctx, None).get_cipher_list() if not n.startswith("TLS_")]


class DtlsSession(Connection):
    """One DTLS association in the one lifecycle."""

    __slots__ = ("addr", "deadline", "endpoint", "listener_proto", "random", "timer")

    def __init__(
        self,
        ctx: ListenerContext,
        addr: Any,
        endpoint: Endpoint,
        listener: DtlsEchoServer,
        random: bytes,
    ) -> None:
        super().__init__(ctx, addr)
        self.addr = addr
        self.random = random  # its ClientHello's: a copy of that hello is no restart
        self.endpoint = endpoint
        self.listener_proto = listener
        self.timer: asyncio.TimerHandle | None = None  # the retransmission timer
        self.deadline: asyncio.TimerHandle | None = None  # the handshake timeout

    def held(self) -> int:
        return 0  # every record is echoed as it arrives

    def close(self, reason: str) -> None:
        self.give_reason(reason)
        self.closing = True
        self.endpoint.close_notify()
        self.listener_proto.flush(self)
        self.listener_proto.end(self)

    def abort(self, reason: str) -> None:
        self.give_reason(reason)
        self.closing = True
        self.listener_proto.end(self)

    def cancel_timers(self) -> None:
        for timer in (self.timer, self.deadline):
            if timer is not None:
                timer.cancel()
        self.timer = self.deadline = None


class DtlsEchoServer(asyncio.DatagramProtocol):
    """The sessions of one ``dtls://`` socket, by peer address."""

    def __init__(
        self,
        *,
        ctx: ListenerContext,
        guard: UdpGuard,
        state: ServerState,
        options: DtlsOptions,
        sslctx: SSL.Context,
    ) -> None:
        self.ctx, self.guard, self.state, self.options = ctx, guard, state, options
        self.sslctx = sslctx
        self.sessions: dict[Any, DtlsSession] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for a peer that went away: its session times out

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is not None and not (
            is_client_hello(data) and hello_random(data) != session.random
        ):  # a new ClientHello (not a copy of the session's own) goes the strangers' way
            self._on_session(session, data)
            return
        self._on_stranger(data, addr, session)

    # -- sources without a session: nothing kept until the cookie verifies ------------------
    def _drop(self, reason: str) -> None:
        self.state.udp.dropped[f"dtls: {reason}"] += 1

    def _on_stranger(self, data: bytes, addr: Any, old: DtlsSession | None) -> None:
        reason = self.guard.check(addr[0], addr[1], self.ctx.loop.time())
        if reason is not None:
            self._drop(reason)
            return
        if self.ctx.draining:
            return
        if not is_client_hello(data):
            self._drop("not a ClientHello")
            return
        conn = SSL.Connection(self.sslctx, None)
        conn.set_app_data(peer_key(addr))
        conn.set_ciphertext_mtu(self.options.mtu)
        conn.bio_write(data)
        try:
            conn.DTLSv1_listen()
        except SSL.WantReadError:  # no valid cookie: the HelloVerifyRequest, nothing kept
            answer = Endpoint(conn, self.options.mtu).outgoing()
            if answer:
                self._send(answer, addr)
                self.state.tls.hello_verify_requests += 1
            else:  # OpenSSL could not parse it: nothing to answer
                self._drop("malformed ClientHello")
            return
        except SSL.Error:
            self._drop("malformed ClientHello")
            return
        if old is not None:
            old.abort(RESTARTED)
        endpoint = Endpoint(conn, self.options.mtu)
        session = DtlsSession(self.ctx, addr, endpoint, self, hello_random(data))
        if not session.admit():
            self._send([alert_record(INTERNAL_ERROR)], addr)
            self._drop("connection limit")
            return
        self.sessions[addr] = session
        session.deadline = self.ctx.loop.call_later(
            self.options.handshake_timeout, self._too_slow, session
        )
        self._advance(session)

    # -- sessions ---------------------------------------------------------------------------
    def _on_session(self, session: DtlsSession, data: bytes) -> None:
        endpoint = session.endpoint
        was_established = endpoint.established
        try:
            records = endpoint.feed(data)
        except SSL.Error as exc:
            self._failed(session, exc, was_established)
            return
        if not was_established:
            self._handshake_progress(session)
        if records and not session.closing:
            for record in records:
                session.bytes_in += len(record)
                endpoint.send(record)
        self.flush(session)
        if endpoint.peer_closed:
            session.close(PEER_CLOSED)  # answers with our close_notify

    def _advance(self, session: DtlsSession) -> None:
        self._step(session, session.endpoint.handshake)

    def _retransmit(self, session: DtlsSession) -> None:
        session.timer = None
        self._step(session, session.endpoint.expire)

    def _step(self, session: DtlsSession, step: Callable[[], object]) -> None:
        """One handshake step (a flight in, or the retransmission timer): send what it made."""
        try:
            step()
        except SSL.Error as exc:
            self._failed(session, exc, False)
            return
        self.flush(session)
        self._handshake_progress(session)

    def _handshake_progress(self, session: DtlsSession) -> None:
        """Re-arm the retransmission timer, or end the handshake's timers once done."""
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        if session.endpoint.established:
            session.cancel_timers()
            return
        wait = session.endpoint.timeout()
        if wait is not None:
            session.timer = self.ctx.loop.call_later(wait, self._retransmit, session)

    def _too_slow(self, session: DtlsSession) -> None:
        session.deadline = None
        report_failure(self.ctx, self.state.tls, session.addr, HANDSHAKE_TIMEOUT, "DTLS")
        session.abort(HANDSHAKE_TIMEOUT)

    def _failed(self, session: DtlsSession, exc: SSL.Error, established: bool) -> None:
        """A fatal alert either way: the alert we owe (if any) goes out, the session ends."""
        self.flush(session)
        reason = describe(exc)
        if not established:
            report_failure(self.ctx, self.state.tls, session.addr, reason, "DTLS")
        session.give_reason(ERROR, reason)
        session.abort(ERROR)

    def flush(self, session: DtlsSession) -> None:
        self._send(session.endpoint.outgoing(), session.addr)

    def _send(self, datagrams: list[bytes], addr: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for datagram in datagrams:
            self.transport.sendto(datagram, addr)

    def end(self, session: DtlsSession) -> None:
        """Forget a session (once) and count it out."""
        session.cancel_timers()
        if self.sessions.get(session.addr) is session:
            del self.sessions[session.addr]
        session.released(0)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve_dtls(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    ctx: ListenerContext,
    guard: UdpGuard,
    state: ServerState,
    options: DtlsOptions,
    sslctx: SSL.Context,
) -> DtlsEchoServer:
    server: DtlsEchoServer | None = None

    def factory() -> DtlsEchoServer:
        nonlocal server
        server = DtlsEchoServer(ctx=ctx, guard=guard, state=state, options=options, sslctx=sslctx)
        return server

    await loop.create_datagram_endpoint(factory, sock=sock)
    assert server is not None
    log_event(logging.DEBUG, "dtls", f"DTLS on {ctx.listener}", listener=ctx.listener)
    return server
