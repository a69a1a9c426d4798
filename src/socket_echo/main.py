"""From a :class:`ServerConfig` to a running server: check the choices, make the TLS context,
bind every listener, then serve in this process or under a supervisor (``--workers``).

Errors a user can act on are :class:`ConfigError` (usage: exit 2) or :class:`StartError`
(run time: exit 1), each one line; cli.py shows them.
"""

from __future__ import annotations

import ssl
from typing import Any

from socket_echo.config import METRICS_BACKLOG, ConfigError, ServerConfig
from socket_echo.gates.quic import QuicSetupError, quic_options
from socket_echo.gates.quic import configuration as quic_configuration
from socket_echo.gates.tls import (
    TlsSetupError,
    apply_ciphers,
    self_signed_context,
    self_signed_pair,
    server_context,
)
from socket_echo.listeners import REUSE_PORT, BindError, BindOptions, adopt_fd, bind_all
from socket_echo.logs import logger, setup_logging
from socket_echo.loops import resolve_loop
from socket_echo.server import run
from socket_echo.supervisors.processes import Supervisor
from socket_echo.tcp import resolve_engine
from socket_echo.udp import resolve_udp_io

TLS_SCHEMES = ("tls", "tls+proxy")


class StartError(Exception):
    """The server cannot start (a port in use, a certificate unreadable): one line, exit 1."""


def check_choices(loop: str, engine: str, udp_io: str, tls_ciphers: str = "secure") -> None:
    """A loop or data path this platform lacks, or cipher suites that match nothing:
    ConfigError before anything is bound or made."""
    resolve_loop(loop)
    resolve_engine(engine)
    resolve_udp_io(udp_io)
    apply_ciphers(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls_ciphers)


def credentials(cfg: ServerConfig) -> tuple[ssl.SSLContext | None, Any]:
    """The TLS context and the QUIC configuration the listeners need (one self-signed
    certificate for both when asked)."""
    schemes = {spec.scheme for spec in cfg.listeners}
    wants_tls, wants_quic = bool(schemes & set(TLS_SCHEMES)), "quic" in schemes
    if not (wants_tls or wants_quic):
        return None, None
    pair = self_signed_pair() if cfg.tls_self_signed else None
    if pair is None and not (cfg.tls_cert and cfg.tls_key):
        kind = "tls://" if wants_tls else "quic://"
        raise ConfigError(
            f"a {kind} listener needs --tls-cert and --tls-key (or --tls-self-signed)"
        )
    sslcontext = tls_context(cfg, pair) if wants_tls else None
    quic = None
    if wants_quic:
        try:
            quic = quic_configuration(quic_options(cfg), cfg.tls_cert, cfg.tls_key, pair)
        except QuicSetupError as exc:
            raise StartError(str(exc)) from None
        logger.info("QUIC: ALPN %s", ", ".join(cfg.quic_alpn))
    return sslcontext, quic


def tls_context(cfg: ServerConfig, pair: tuple[Any, Any] | None = None) -> ssl.SSLContext:
    """The server's SSLContext for its TLS listeners, its suites logged."""
    if pair is not None:
        ctx, fingerprint = self_signed_context(pair)
        logger.info("TLS: self-signed certificate for localhost, SHA-256 %s", fingerprint)
    else:
        assert cfg.tls_cert and cfg.tls_key
        try:
            ctx = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        except TlsSetupError as exc:
            raise StartError(str(exc)) from None
    suites = apply_ciphers(ctx, cfg.tls_ciphers)
    logger.info("TLS: cipher suites (--tls-ciphers %s): %s", cfg.tls_ciphers, ", ".join(suites))
    return ctx


def serve(cfg: ServerConfig) -> int:
    """Bind and serve until a signal; returns the exit code."""
    check_choices(cfg.loop, cfg.engine, cfg.udp_io, cfg.tls_ciphers)
    setup_logging(cfg.log_level, cfg.log_format)
    sslcontext, quic = credentials(cfg)
    # With workers and SO_REUSEPORT, this process only holds the addresses (TCP bound, not
    # listening); each worker binds its own sockets. See supervisors/processes.py.
    reuse = cfg.workers > 1 and REUSE_PORT
    try:
        fd_bound = [adopt_fd(fd) for fd in cfg.fds]
        bound = (
            bind_all(cfg.listeners, BindOptions(cfg.backlog, reuse_port=reuse, listen=not reuse))
            if cfg.listeners
            else []
        )
        metrics_bound = bind_all((cfg.metrics,), METRICS_BACKLOG) if cfg.metrics else []
    except BindError as exc:
        raise StartError(exc.strerror or str(exc)) from None
    if cfg.workers == 1:
        return run(cfg, bound + fd_bound, sslcontext, metrics_bound, quic)
    own = [b for b in bound if reuse and b.scheme != "unix"]
    shared = [b for b in bound if b not in own] + fd_bound
    try:
        supervisor = Supervisor(cfg, cfg.workers, shared, own, metrics_bound, sslcontext, quic)
    except OSError as exc:  # its run directory (TMPDIR)
        where = f" ({exc.filename})" if exc.filename else ""
        raise StartError(f"--workers: no run directory: {exc.strerror or exc}{where}") from None
    return supervisor.run()
