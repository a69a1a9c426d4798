"""The server: owns the loop, the listeners, the limits and shutdown; no protocol details.

Lifecycle: bind (in ``run``, before the loop starts, so bind errors are plain exit codes) ->
serve -> on SIGTERM/SIGINT stop accepting and drain up to ``--graceful-timeout`` -> close what
is left, delivering what was already received -> exit 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from socket_echo.config import CLOSE_WAIT, UDP_REPORT_EVERY, ServerConfig
from socket_echo.exits import FAILED, OK
from socket_echo.gates.credentials import Credentials
from socket_echo.gates.wiring import Listening, StreamSetup, serve_stream_listener
from socket_echo.impair.datagram import ImpairedUdpEcho
from socket_echo.impair.stream import ImpairedEcho
from socket_echo.kinds import DTLS, QUIC, UDP, kind
from socket_echo.lifecycle import SHUTDOWN, ListenerContext
from socket_echo.limits import ConnectionTable, descriptor_budget
from socket_echo.listeners import BoundListener, close_all
from socket_echo.logs import log_event, logger
from socket_echo.loops import loop_factory, resolve_loop
from socket_echo.state import ServerState
from socket_echo.tcp.accept import RESOURCE_ERRORS
from socket_echo.tcp.epoll import EpollEngine
from socket_echo.tcp.native import NativeEngine
from socket_echo.tcp.paths import resolve_engine
from socket_echo.tcp.protocol import EchoProtocol
from socket_echo.udp.guard import UdpGuard
from socket_echo.udp.paths import UdpServing, resolve_udp_io, serve_udp

if TYPE_CHECKING:
    from socket_echo.servers.dtls import DtlsEchoServer
    from socket_echo.servers.quic import EchoQuicServer


class EchoServer:
    def __init__(
        self,
        config: ServerConfig,
        listeners: list[BoundListener],
        credentials: Credentials | None = None,
    ) -> None:
        self.config = config
        self.credentials = credentials or Credentials()
        self.listeners = listeners
        budget = descriptor_budget(config.max_connections, config.metrics is not None)
        self.table = ConnectionTable(config.max_connections, config.idle_timeout, budget)
        self.state = ServerState(self.table)
        if budget < config.max_connections:
            log_event(
                logging.WARNING,
                "descriptor_limit",
                f"the descriptor limit leaves room for {budget} connections, below "
                f"--max-connections {config.max_connections}: raise it (ulimit -n)",
                budget=budget,
            )
        self.stopping = asyncio.Event()
        self.stop_signal = ""
        self.engine: EpollEngine | NativeEngine | None = None
        self.metrics_listeners: list[BoundListener] = []
        self._metrics_servers: list[asyncio.AbstractServer] = []
        self._udp: list[UdpServing] = []
        self._udp_report: asyncio.TimerHandle | None = None
        self._listening: list[Listening] = []
        self._quic: list[EchoQuicServer] = []
        self._dtls: list[DtlsEchoServer] = []
        self._contexts: list[ListenerContext] = []

    async def start(self) -> None:
        loop = self.state.loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        cfg = self.config
        engine = resolve_engine(cfg.engine)
        if engine == "native":
            self.engine = NativeEngine(
                loop,
                cfg.max_buffer,
                self.state.accept_paused,
                self.table,
                want_peers=cfg.access_log,
            )
        elif engine == "epoll":
            self.engine = EpollEngine(loop, cfg.max_buffer, self.state.accept_paused)
        own_ports = frozenset(b.spec.port for b in self.listeners if not kind(b.scheme).unix)
        guard = self.state.udp_guard = UdpGuard(
            cfg.udp_rate,
            cfg.udp_burst,
            cfg.udp_max_rate,
            cfg.udp_allow_privileged_ports,
            own_ports,
            cfg.udp_max_sources,
        )
        setup = StreamSetup(
            loop,
            self.state,
            resolve_loop(cfg.loop) == "uvloop",
            cfg.backlog,
            cfg.tls_handshake_timeout,
            cfg.proxy_header_timeout,
            cfg.max_handshakes,
            self.credentials.tls,
            self.engine,
        )
        for bound in self.listeners:
            listener_kind = kind(bound.scheme)
            dual = "dual-stack " if bound.dual_stack else ""
            impair = bound.spec.impair or None
            if listener_kind.served_by == QUIC:
                from socket_echo.servers.quic import serve_quic  # aioquic: here only

                ctx = ListenerContext(self.table, bound.url, cfg.max_buffer, cfg.access_log, loop)
                self._contexts.append(ctx)
                options = self.credentials.quic_options
                self._quic.append(
                    await serve_quic(
                        loop, bound.sock, ctx, guard, self.state, options, self.credentials.quic
                    )
                )
                what = (
                    f"QUIC echo server listening on {bound.url} ({dual}ALPN "
                    f"{', '.join(options.alpn)}, up to {cfg.max_connections} clients, "
                    f"{options.max_streams} streams each{', Retry' if options.retry else ''})"
                )
            elif listener_kind.served_by == DTLS:
                from socket_echo.servers.dtls import (  # pyOpenSSL: here only
                    dtls_options,
                    serve_dtls,
                )

                ctx = ListenerContext(self.table, bound.url, cfg.max_buffer, cfg.access_log, loop)
                self._contexts.append(ctx)
                self._dtls.append(
                    await serve_dtls(
                        loop,
                        bound.sock,
                        ctx,
                        guard,
                        self.state,
                        dtls_options(cfg),
                        self.credentials.dtls,
                    )
                )
                what = (
                    f"DTLS 1.2 echo server listening on {bound.url} ({dual}up to "
                    f"{cfg.max_connections} sessions, HelloVerifyRequest cookies"
                    f"{', client certificates required' if cfg.tls_client_ca else ''})"
                )
            elif listener_kind.served_by == UDP:
                if impair:
                    udp: UdpServing = ImpairedUdpEcho(
                        loop,
                        bound.sock,
                        guard,
                        self.state.udp,
                        impair,
                        bound.url,
                        self.state.impairments,
                    )
                    path = "impaired"
                else:
                    udp = serve_udp(loop, bound.sock, guard, self.state.udp, cfg.udp_io)
                    path = resolve_udp_io(cfg.udp_io)
                self._udp.append(udp)
                what = (
                    f"UDP echo server listening on {bound.url} ({dual}up to "
                    f"{cfg.udp_rate:g} datagrams/s per source prefix; {path} path)"
                )
            else:
                ctx = ListenerContext(
                    self.table,
                    bound.url,
                    cfg.max_buffer,
                    cfg.access_log,
                    loop,
                    impair,
                    self.state.impairments,
                )
                ctx.make_echo = ImpairedEcho if impair else EchoProtocol
                self._contexts.append(ctx)
                self._listening.append(
                    await serve_stream_listener(setup, bound.scheme, bound.sock, ctx)
                )
                path = engine if listener_kind.takes_engine(bool(impair)) else "protocol"
                what = (
                    f"{listener_kind.name} echo server listening on {bound.url} "
                    f"({dual}backlog {cfg.backlog}, up to {cfg.max_connections} clients; "
                    f"{'impaired' if impair else path} path)"
                )
            extra = {}
            if impair:
                what += f"; impairments: {impair.describe()}"
                extra["impairments"] = impair.describe()
            log_event(
                logging.INFO, "listening", what, listener=bound.url, port=bound.spec.port, **extra
            )
        if self._udp:
            self._udp_report = loop.call_later(UDP_REPORT_EVERY, self._report_udp, loop)
        self.table.start_sweeping(loop)
        await self._serve_metrics(loop)
        self.state.accepting = True

    async def _serve_metrics(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.metrics_listeners:
            return
        # Imported with --metrics only: prometheus_client and the HTTP modules it brings are a
        # fifth of a plain server's import time.
        from socket_echo.metrics import health_factory, registry_for

        registry = registry_for(self.state)

        health = health_factory(registry, lambda: "" if self.state.accepting else "draining", loop)

        for bound in self.metrics_listeners:
            self._metrics_servers.append(await loop.create_server(health, sock=bound.sock))
            url = bound.url.replace("tcp://", "http://")
            log_event(
                logging.DEBUG if kind(bound.scheme).unix else logging.INFO,  # a worker's own
                "metrics",
                f"metrics and health on {url} (/metrics, /healthz, /readyz)",
                listener=url,
                port=bound.spec.port,
            )

    def _report_udp(self, loop: asyncio.AbstractEventLoop) -> None:
        self.state.udp.report()
        self._udp_report = loop.call_later(UDP_REPORT_EVERY, self._report_udp, loop)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            if sig == signal.SIGINT:
                log_event(logging.WARNING, "forced_exit", "second interrupt: exiting now")
                logging.shutdown()
                os._exit(FAILED)
            return
        self.stop_signal = sig.name
        self.stopping.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRORS:
            self.state.accept_paused.note()
            return
        loop.default_exception_handler(context)

    async def stop_accepting(self) -> None:
        self.state.accepting = False  # /readyz answers 503 from now on; /metrics serves on
        if self.engine is not None:
            self.engine.stop_accepting()
        for ctx in self._contexts:
            ctx.draining = True
        for listening in self._listening:
            listening.close()
        for udp in self._udp:
            udp.close()

        if self._udp_report is not None:
            self._udp_report.cancel()
            self.state.udp.report()
        close_all(self.listeners)
        await asyncio.sleep(0)  # uvloop closes its listening handles on the next iteration
        await asyncio.sleep(0)

    def _close_all(self, abort: bool) -> None:
        self.table.list_all()
        for conn in list(self.table.open):
            (conn.abort if abort else conn.close)(SHUTDOWN)

    async def _wait_closed(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.table.count() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def drain(self) -> None:
        """Let open connections finish up to the graceful timeout, then close the rest:
        each first gets what it is owed, then FIN; after CLOSE_WAIT the rest are reset."""
        await self._wait_closed(self.config.graceful_timeout)
        if self.table.count():
            log_event(
                logging.INFO,
                "shutdown",
                f"graceful timeout: closing {self.table.count()} connection(s)",
            )
            self._close_all(abort=False)
            await self._wait_closed(CLOSE_WAIT)
            self._close_all(abort=True)
        self.table.stop_sweeping()
        for quic in self._quic:  # every QUIC connection is closed by now: stop listening
            quic.close()
        for dtls in self._dtls:  # every session was sent its close_notify by now
            dtls.close()
        if self.engine is not None:
            self.engine.shutdown()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Start, tell ``on_ready`` (a worker's readiness: it serves now), serve until a
        signal, drain."""
        await self.start()
        if on_ready is not None:
            on_ready()
        await self.stopping.wait()
        await self.stop_accepting()
        log_event(
            logging.INFO,
            "shutdown",
            f"{self.stop_signal}: no longer accepting; draining {self.table.count()} "
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
            d_in, d_out, _, _ = self.state.udp.totals()
            dropped = self.state.udp.drops()
            log_event(
                logging.INFO,
                "stopped_udp",
                f"UDP: {d_in} datagram(s) in, {d_out} answered, {sum(dropped.values())} dropped",
                datagrams_in=d_in,
                datagrams_out=d_out,
                dropped=dict(dropped),
            )


def run(
    config: ServerConfig,
    listeners: list[BoundListener],
    credentials: Credentials | None = None,
    metrics_listeners: list[BoundListener] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Serve already-bound listeners until a signal; returns the exit code. ``on_ready`` is
    called once every listener serves (supervisors/processes.py: the worker's readiness)."""
    loop = loop_factory(config.loop)()
    asyncio.set_event_loop(loop)
    server = EchoServer(config, listeners, credentials)
    server.metrics_listeners = metrics_listeners or []
    try:
        loop.run_until_complete(server.serve(on_ready))
    except OSError as exc:
        logger.error("server failed: %s", exc.strerror or exc)
        return FAILED
    finally:
        close_all(listeners)
        close_all(metrics_listeners or [])
        loop.close()
    return OK
