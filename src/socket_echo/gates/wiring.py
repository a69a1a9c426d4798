"""How each kind of stream listener reaches the echo: which gates an accepted connection
passes (PROXY header, TLS handshake) and which data path it ends on. The server calls
:func:`serve_stream_listener` once per listener and never looks inside.

| scheme     | accept                         | then                                       |
|------------|--------------------------------|--------------------------------------------|
| tcp, unix  | the engine's own (native/epoll)| echo on the native or epoll path           |
|            | or the loop's server           | echo on the Protocol path                  |
| tcp+proxy  | the loop's server / reader     | ProxyGate, then the Protocol path          |
| tls        | AcceptReader (raw socket)      | TLS handshake, then the Protocol path      |
| tls+proxy  | AcceptReader (raw socket)      | HeaderPreReader, TLS, then Protocol path   |

uvloop's own server copes with EMFILE itself; on the stdlib loop every listener goes through
tcp/accept.py's AcceptReader, which pauses and resumes (see there). An impaired listener
(``?delay=...``) never goes to an engine: its connections end on impair/stream.py's echo.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from collections.abc import Callable
from typing import Any

from socket_echo.gates.proxy_gate import HeaderPreReader
from socket_echo.gates.proxy_gate import gate_factory as proxy_gate_factory
from socket_echo.gates.tls import TOO_MANY_HANDSHAKES, TlsGate, native_handshake
from socket_echo.kinds import kind
from socket_echo.lifecycle import ListenerContext, reset
from socket_echo.logs import RateLimitedLog
from socket_echo.state import ServerState
from socket_echo.tcp.accept import AcceptReader, adopt
from socket_echo.tcp.epoll import EpollEngine
from socket_echo.tcp.native import NativeEngine


@dataclasses.dataclass(frozen=True)
class StreamSetup:
    """What the wiring needs besides the listener: fixed for the server's life."""

    loop: asyncio.AbstractEventLoop
    state: ServerState
    uvloop: bool  # uvloop serves plain listeners and does TLS itself
    backlog: int
    tls_handshake_timeout: float
    proxy_header_timeout: float
    max_handshakes: int
    sslcontext: ssl.SSLContext | None = None
    engine: EpollEngine | NativeEngine | None = None  # native or epoll path for tcp/unix


class Listening:
    """A stream listener being served: stop it with :meth:`close`."""

    def __init__(
        self, server: asyncio.AbstractServer | None = None, reader: AcceptReader | None = None
    ) -> None:
        self.server = server
        self.reader = reader

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.reader is not None:
            self.reader.close()


async def serve_stream_listener(
    setup: StreamSetup, scheme: str, sock: socket.socket, ctx: ListenerContext
) -> Listening:
    loop, state = setup.loop, setup.state
    listener_kind = kind(scheme)
    if setup.engine is not None and listener_kind.takes_engine(bool(ctx.impair)):
        setup.engine.add_listener(sock, ctx)
        return Listening()  # the engine stops accepting with the rest of its work
    if listener_kind.tls:
        return _listen(setup, sock, ctx, on_accept=_tls_acceptor(setup, scheme, ctx))
    factory: Callable[[], asyncio.Protocol]
    if listener_kind.proxy:
        factory = proxy_gate_factory(ctx, state.proxy, setup.proxy_header_timeout)
    else:

        def factory() -> asyncio.Protocol:
            return ctx.new_echo()

    if setup.uvloop:  # libuv copes with EMFILE itself
        return Listening(server=await loop.create_server(factory, sock=sock, backlog=setup.backlog))
    return _listen(setup, sock, ctx, factory=factory)


def _listen(
    setup: StreamSetup,
    sock: socket.socket,
    ctx: ListenerContext,
    factory: Callable[[], asyncio.Protocol] | None = None,
    on_accept: Callable[[socket.socket], None] | None = None,
) -> Listening:
    reader = AcceptReader(setup.loop, sock, factory, setup.state.accept_paused, on_accept)
    reader.start()
    ctx.table.on_close.append(reader.resume_if_paused)  # a descriptor just came free
    return Listening(reader=reader)


def _tls_acceptor(
    setup: StreamSetup, scheme: str, ctx: ListenerContext
) -> Callable[[socket.socket], None]:
    """TLS listeners accept raw sockets themselves: tls+proxy must read the PROXY header
    before the handshake, and a handshake's failure must reach us to be named. uvloop does
    the TLS itself (connect_accepted_socket); the stdlib loop goes through the TLS gate."""
    assert setup.sslcontext is not None
    loop, stats = setup.loop, setup.state
    sslcontext, timeout = setup.sslcontext, setup.tls_handshake_timeout
    slots = stats.tls.slots(setup.max_handshakes)
    # under a flood a line per reset would be a flood of lines: counted each, logged a second
    full = RateLimitedLog(
        "handshakes_full",
        f"{ctx.listener}: {{count}} connection(s) reset: {setup.max_handshakes} handshakes "
        "already in progress (--max-handshakes)",
    )

    def handshake(sock: socket.socket, peer: Any = None) -> None:
        if not slots.take():  # --max-handshakes: reset at once, as the cap does
            reset(sock)
            stats.tls.handshake_failures[TOO_MANY_HANDSHAKES] += 1
            full.note()
            return
        loop.create_task(handshake_in_slot(sock, peer))

    async def handshake_in_slot(sock: socket.socket, peer: Any) -> None:
        try:
            if setup.uvloop:
                await native_handshake(ctx, sock, sslcontext, timeout, stats.tls, peer)
            else:
                gate = TlsGate(ctx, sslcontext, timeout, stats.tls, peer)
                await adopt(loop, lambda: gate, sock)
                if gate.task is not None:  # made in connection_made, before adopt returns
                    await gate.task
        finally:
            slots.give()

    if not kind(scheme).proxy:
        return handshake

    def after_header(sock: socket.socket) -> None:
        HeaderPreReader(
            loop,
            sock,
            ctx.listener,
            stats.proxy,
            ctx.access_log,
            lambda s, header: handshake(s, header.source),
            setup.proxy_header_timeout,
        )

    return after_header
