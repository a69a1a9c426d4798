"""The tools' DTLS 1.2 client: one association over a connected UDP socket, on asyncio.

Used by ``client``, ``probe`` and ``bench`` for ``dtls://`` targets. It verifies the server's
certificate (``--ca``, else the system's store; ``--insecure`` skips it) and the name it was
asked for (service_identity: pyOpenSSL checks no host name itself), sees whether the server
asked for a cookie (a HelloVerifyRequest), counts the handshake's retransmissions, and can be
told to lose datagrams on purpose (probe's handshake under loss).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
from collections.abc import Callable
from typing import Any, cast

from OpenSSL import SSL

from socket_echo.config import DTLS_MTU
from socket_echo.dtls_wire import (
    DTLS1_2_VERSION,
    HELLO_VERIFY_REQUEST,
    Endpoint,
    describe,
    handshake_type,
)
from socket_echo.tools.connect.target import ICMP_REFUSED, Target, TlsOptions, Unreachable

# (direction "in" or "out", index of the datagram in that direction) -> lose it?
LossRule = Callable[[str, int], bool]


class DtlsFailed(Exception):
    """The association failed; the message names why (one line)."""


def client_context(tls: TlsOptions | None) -> SSL.Context:
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_QUERY_MTU)
    if tls is not None and tls.insecure:
        return ctx
    if tls is not None and tls.ca_file:
        try:
            ctx.load_verify_locations(tls.ca_file)
        except SSL.Error as exc:
            raise Unreachable(f"--ca {tls.ca_file}: {describe(exc)}") from None
    else:
        ctx.set_default_verify_paths()
    ctx.set_verify(SSL.VERIFY_PEER)
    return ctx


class DtlsClient(asyncio.DatagramProtocol):
    def __init__(self, ctx: SSL.Context, host: str, verify: bool, lose: LossRule | None) -> None:
        conn = SSL.Connection(ctx, None)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            conn.set_tlsext_host_name(host.encode("idna"))
        conn.set_connect_state()
        self.endpoint = Endpoint(conn, DTLS_MTU)
        self.host, self.verify, self.lose = host, verify, lose
        self.transport: asyncio.DatagramTransport | None = None
        self.records: collections.deque[bytes] = collections.deque()
        self.changed = asyncio.Event()
        self.error: str | None = None
        self.hello_verify = False  # the server asked for a cookie
        self.retransmissions = 0
        self.datagrams = {"in": 0, "out": 0}
        self.lost = 0

    # -- asyncio -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._lost("in"):
            return
        if handshake_type(data) == HELLO_VERIFY_REQUEST:
            self.hello_verify = True
        try:
            self.records.extend(self.endpoint.feed(data))
        except SSL.Error as exc:
            self.error = self.error or f"handshake failed: {describe(exc)}"
        self.flush()
        self.changed.set()

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self.error = ICMP_REFUSED
        else:
            self.error = str(exc)
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.changed.set()

    # -- the association -----------------------------------------------------------------
    def _lost(self, direction: str) -> bool:
        index = self.datagrams[direction]
        self.datagrams[direction] = index + 1
        if self.lose is not None and self.lose(direction, index):
            self.lost += 1
            return True
        return False

    def flush(self) -> None:
        for datagram in self.endpoint.outgoing():
            if self.transport is not None and not self._lost("out"):
                self.transport.sendto(datagram)

    async def _wait(self, seconds: float) -> bool:
        """Wait for news up to ``seconds``; False on a timeout."""
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), max(seconds, 0.0))
        except asyncio.TimeoutError:
            return False
        return True

    async def handshake(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            self.endpoint.handshake()
        except SSL.Error as exc:
            raise DtlsFailed(f"handshake failed: {describe(exc)}") from None
        self.flush()
        while not self.endpoint.established:
            if self.error:
                raise DtlsFailed(self.error)
            left = deadline - loop.time()
            if left <= 0:
                raise DtlsFailed(f"no DTLS handshake within {timeout:g} s")
            timer = self.endpoint.timeout()
            woken = await self._wait(left if timer is None else min(timer, left))
            if not woken and timer is not None and timer <= left:
                self.endpoint.expire()
                self.retransmissions += 1
                self.flush()
        if self.verify:
            self._check_name()

    def _check_name(self) -> None:
        from service_identity import VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            check: Callable[[Any, str], None] = verify_hostname
        else:
            check = verify_ip_address
        try:
            check(self.endpoint.conn, self.host)
        except VerificationError:
            raise DtlsFailed(f"the server's certificate is not for {self.host}") from None

    def send(self, record: bytes) -> None:
        self.endpoint.send(record)
        self.flush()

    async def recv(self, timeout: float) -> bytes | None:
        """The next application record, or None after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.records:
            if self.error:
                raise DtlsFailed(self.error)
            if self.endpoint.peer_closed:
                raise DtlsFailed("the server closed the session (close_notify)")
            if not await self._wait(deadline - loop.time()):
                return None
        return self.records.popleft()

    @property
    def suite(self) -> str:
        return self.endpoint.conn.get_cipher_name() or "?"

    def close(self) -> None:
        """Send close_notify and close the socket."""
        self.endpoint.close_notify()
        self.flush()
        if self.transport is not None:
            self.transport.close()


async def open_dtls(
    target: Target,
    tls: TlsOptions | None,
    timeout: float,
    lose: LossRule | None = None,
    context: SSL.Context | None = None,
    local_port: int = 0,
) -> DtlsClient:
    """A client whose handshake finished; DtlsFailed or Unreachable (one line) otherwise.
    ``context``: a client context of one's own (a client certificate, chosen suites);
    ``local_port``: the source port (a client that restarts on the same one)."""
    loop = asyncio.get_running_loop()
    ctx = context or client_context(tls)
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise Unreachable(f"{target.url}: unknown host ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    verify = not (tls is not None and tls.insecure)
    name = (tls.server_name if tls is not None else None) or target.host
    _, client = await loop.create_datagram_endpoint(
        lambda: DtlsClient(ctx, name, verify, lose),
        remote_addr=cast(tuple[str, int], addr[:2]),
        family=family,
        local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", local_port)
        if local_port
        else None,
    )
    try:
        await client.handshake(timeout)
    except BaseException:
        client.close()
        raise
    return client
