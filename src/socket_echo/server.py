"""The server: owns the loop, the listeners, the limits and shutdown; no protocol details.

Lifecycle: bind (in ``run``, before the loop starts, so bind errors are plain exit codes) ->
serve -> on SIGTERM/SIGINT stop accepting and drain up to ``--graceful-timeout`` -> close what
is left, delivering what was already received -> exit 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

from socket_echo.accept import RESOURCE_ERRORS, AcceptReader, descriptor_log
from socket_echo.config import ConfigError, ServerConfig
from socket_echo.engine import EpollEngine
from socket_echo.limits import ConnectionTable, descriptor_budget
from socket_echo.listeners import BoundListener, close_all
from socket_echo.logs import log_event, logger
from socket_echo.loops import loop_factory, resolve_loop
from socket_echo.metrics import HealthHttp, registry_for
from socket_echo.protocols.proxy_gate import HeaderPreReader, ProxyStats
from socket_echo.protocols.proxy_gate import gate_factory as proxy_gate_factory
from socket_echo.protocols.tcp import ConnectionContext, EchoProtocol
from socket_echo.protocols.tls import TlsStats, gate_factory, native_handshake
from socket_echo.protocols.udp import REPORT_EVERY, UdpServing, UdpStats, serve_udp
from socket_echo.udp_guard import UdpGuard

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
CLOSE_WAIT = 1.0  # after the graceful timeout: time to deliver what is owed before abort


def use_epoll_engine(engine: str) -> bool:
    """``--engine``: whether the epoll engine serves TCP; ConfigError if it cannot here."""
    if engine == "epoll" and not hasattr(select, "epoll"):
        raise ConfigError("--engine epoll: this platform has no epoll (use --engine protocol)")
    return engine == "epoll" or (engine == "auto" and hasattr(select, "epoll"))


class EchoServer:
    def __init__(
        self,
        config: ServerConfig,
        listeners: list[BoundListener],
        sslcontext: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.sslcontext = sslcontext
        self.tls_stats = TlsStats()
        self.proxy_stats = ProxyStats()
        self.listeners = listeners
        budget = descriptor_budget(config.max_connections)
        self.table = ConnectionTable(config.max_connections, config.idle_timeout, budget)
        if budget < config.max_connections:
            log_event(
                logging.WARNING,
                "descriptor_limit",
                f"the descriptor limit leaves room for {budget} connections, below "
                f"--max-connections {config.max_connections}: raise it (ulimit -n)",
                budget=budget,
            )
        self.exhausted = descriptor_log()
        self.stopping = asyncio.Event()
        self.stop_signal = ""
        self.engine: EpollEngine | None = None
        self.accepting = False  # /readyz: true from start until a drain begins
        self.metrics_listeners: list[BoundListener] = []
        self._metrics_servers: list[asyncio.AbstractServer] = []
        self.udp_stats = UdpStats()
        self.udp_guard: UdpGuard | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._udp: list[UdpServing] = []
        self._udp_report: asyncio.TimerHandle | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._readers: list[AcceptReader] = []
        self._contexts: list[ConnectionContext] = []

    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if use_epoll_engine(self.config.engine):
            self.engine = EpollEngine(
                loop, self.table, self.config.max_buffer, self.config.access_log, self.exhausted
            )
        own_ports = frozenset(b.spec.port for b in self.listeners if b.scheme != "unix")
        guard = self.udp_guard = UdpGuard(
            self.config.udp_rate,
            self.config.udp_burst,
            self.config.udp_max_rate,
            self.config.udp_allow_privileged_ports,
            own_ports,
            self.config.udp_max_sources,
        )
        for bound in self.listeners:
            kind = "dual-stack " if bound.dual_stack else ""
            if bound.scheme == "udp":
                self._udp.append(
                    serve_udp(loop, bound.sock, guard, self.udp_stats, self.config.udp_io)
                )
                what = (
                    f"UDP echo server listening on {bound.url} ({kind}up to "
                    f"{self.config.udp_rate:g} datagrams/s per source prefix)"
                )
            else:
                await self._listen(loop, bound)
                name = {
                    "tcp": "TCP",
                    "tls": "TLS",
                    "unix": "Unix-socket",
                    "tcp+proxy": "TCP (PROXY protocol)",
                    "tls+proxy": "TLS (PROXY protocol)",
                }[bound.scheme]
                what = (
                    f"{name} echo server listening on {bound.url} ({kind}backlog "
                    f"{self.config.backlog}, up to {self.config.max_connections} clients)"
                )
            log_event(logging.INFO, "listening", what, listener=bound.url, port=bound.spec.port)
        if self._udp:
            self._udp_report = loop.call_later(REPORT_EVERY, self._report_udp, loop)
        self.table.start_sweeping(loop)
        await self._serve_metrics(loop)
        self.accepting = True

    async def _serve_metrics(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.metrics_listeners:
            return
        registry = registry_for(self)

        def health() -> asyncio.Protocol:
            return HealthHttp(registry, lambda: self.accepting, loop)

        for bound in self.metrics_listeners:
            self._metrics_servers.append(await loop.create_server(health, sock=bound.sock))
            url = bound.url.replace("tcp://", "http://")
            log_event(
                logging.DEBUG if bound.scheme == "unix" else logging.INFO,  # a worker's own
                "metrics",
                f"metrics and health on {url} (/metrics, /healthz, /readyz)",
                listener=url,
                port=bound.spec.port,
            )

    async def _listen(self, loop: asyncio.AbstractEventLoop, bound: BoundListener) -> None:
        if self.engine is not None and bound.scheme in ("tcp", "unix"):
            self.engine.add_listener(bound.sock, bound.url)
            return
        ctx = ConnectionContext(
            self.table, bound.url, self.config.max_buffer, self.config.access_log, loop
        )
        self._contexts.append(ctx)
        factory: Callable[[], asyncio.Protocol]
        if bound.scheme in ("tls", "tls+proxy"):
            self._listen_tls(loop, bound, ctx)
            return
        if bound.scheme == "tcp+proxy":
            factory = proxy_gate_factory(ctx, self.proxy_stats)
        else:

            def factory() -> asyncio.Protocol:
                return EchoProtocol(ctx)

        if resolve_loop(self.config.loop) == "uvloop":  # libuv copes with EMFILE itself
            self._servers.append(
                await loop.create_server(factory, sock=bound.sock, backlog=self.config.backlog)
            )
        else:
            reader = AcceptReader(loop, bound.sock, factory, self.exhausted)
            reader.start()
            self._readers.append(reader)
            self.table.on_close.append(reader.resume_if_paused)

    def _listen_tls(
        self, loop: asyncio.AbstractEventLoop, bound: BoundListener, ctx: ConnectionContext
    ) -> None:
        """TLS listeners accept raw sockets themselves: tls+proxy must read the PROXY header
        before the handshake, and a handshake's failure must reach us to be named. uvloop does
        the TLS itself (connect_accepted_socket); the stdlib loop goes through the gate."""
        assert self.sslcontext is not None
        sslcontext, timeout = self.sslcontext, self.config.tls_handshake_timeout
        native = resolve_loop(self.config.loop) == "uvloop"

        def handshake(sock: socket.socket, peer: Any = None) -> None:
            if native:
                loop.create_task(
                    native_handshake(ctx, sock, sslcontext, timeout, self.tls_stats, peer)
                )
            else:
                factory = gate_factory(ctx, sslcontext, timeout, self.tls_stats, peer)
                loop.create_task(self._adopt(loop, factory, sock))

        def accepted(sock: socket.socket) -> None:
            if bound.scheme == "tls+proxy":
                HeaderPreReader(
                    loop,
                    sock,
                    bound.url,
                    self.proxy_stats,
                    self.config.access_log,
                    lambda s, header: handshake(s, header.source),
                )
            else:
                handshake(sock)

        reader = AcceptReader(loop, bound.sock, None, self.exhausted, on_accept=accepted)
        reader.start()
        self._readers.append(reader)
        self.table.on_close.append(reader.resume_if_paused)

    @staticmethod
    async def _adopt(
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
    ) -> None:
        try:
            await loop.connect_accepted_socket(factory, sock)
        except OSError:
            sock.close()

    def _report_udp(self, loop: asyncio.AbstractEventLoop) -> None:
        self.udp_stats.report()
        self._udp_report = loop.call_later(REPORT_EVERY, self._report_udp, loop)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            if sig == signal.SIGINT:
                log_event(logging.WARNING, "forced_exit", "second interrupt: exiting now")
                logging.shutdown()
                os._exit(EXIT_FAILURE)
            return
        self.stop_signal = sig.name
        self.stopping.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRORS:
            self.exhausted.note()
            return
        loop.default_exception_handler(context)

    async def stop_accepting(self) -> None:
        self.accepting = False  # /readyz answers 503 from now on; /metrics keeps serving
        if self.engine is not None:
            self.engine.stop_accepting()
        for ctx in self._contexts:
            ctx.draining = True
        for server in self._servers:
            server.close()
        for reader in self._readers:
            reader.close()
        for udp in self._udp:
            udp.close()
        if self._udp_report is not None:
            self._udp_report.cancel()
            self.udp_stats.report()
        close_all(self.listeners)
        await asyncio.sleep(0)  # uvloop closes its listening handles on the next iteration
        await asyncio.sleep(0)

    def _close_all(self, reason: str, abort: bool) -> None:
        if self.engine is not None:
            (self.engine.abort_all if abort else self.engine.close_all)(reason)
        for conn in list(self.table.open):
            if isinstance(conn, EchoProtocol):
                (conn.abort if abort else conn.close)(reason)

    async def _wait_closed(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.table.open and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def drain(self) -> None:
        """Let open connections finish up to the graceful timeout, then close the rest:
        each first gets what it is owed, then FIN; after CLOSE_WAIT the rest are reset."""
        await self._wait_closed(self.config.graceful_timeout)
        if self.table.open:
            log_event(
                logging.INFO,
                "shutdown",
                f"graceful timeout: closing {len(self.table.open)} connection(s)",
            )
            self._close_all("shutdown", abort=False)
            await self._wait_closed(CLOSE_WAIT)
            self._close_all("shutdown", abort=True)
        self.table.stop_sweeping()
        if self.engine is not None:
            self.engine.shutdown()

    async def serve(self) -> None:
        await self.start()
        await self.stopping.wait()
        await self.stop_accepting()
        log_event(
            logging.INFO,
            "shutdown",
            f"{self.stop_signal}: no longer accepting; draining {len(self.table.open)} "
            f"connection(s) for up to {self.config.graceful_timeout:g} s",
        )
        await self.drain()
        closed = ", ".join(f"{n} {r}" for r, n in sorted(self.table.closed.items())) or "none"
        log_event(
            logging.INFO,
            "stopped",
            f"stopped: {self.table.opened} connection(s) served ({closed}); "
            f"{self.table.bytes_in} B in, {self.table.bytes_out} B out",
            connections=self.table.opened,
            bytes_in=self.table.bytes_in,
            bytes_out=self.table.bytes_out,
        )
        for metrics_server in self._metrics_servers:
            metrics_server.close()
        close_all(self.metrics_listeners)
        if self._udp:
            u = self.udp_stats
            log_event(
                logging.INFO,
                "stopped_udp",
                f"UDP: {u.datagrams_in} datagram(s) in, {u.datagrams_out} answered, "
                f"{sum(u.dropped.values())} dropped",
                datagrams_in=u.datagrams_in,
                datagrams_out=u.datagrams_out,
                dropped=dict(u.dropped),
            )


def run(
    config: ServerConfig,
    listeners: list[BoundListener],
    sslcontext: ssl.SSLContext | None = None,
    metrics_listeners: list[BoundListener] | None = None,
) -> int:
    """Serve already-bound listeners until a signal; returns the exit code."""
    loop = loop_factory(config.loop)()
    asyncio.set_event_loop(loop)
    server = EchoServer(config, listeners, sslcontext)
    server.metrics_listeners = metrics_listeners or []
    try:
        loop.run_until_complete(server.serve())
    except OSError as exc:
        logger.error("server failed: %s", exc.strerror or exc)
        return EXIT_FAILURE
    finally:
        close_all(listeners)
        close_all(metrics_listeners or [])
        loop.close()
    return EXIT_OK
