"""From a :class:`ServerConfig` to a running server: check the choices, make the credentials
(gates/credentials.py), bind every listener, then serve in this process or under a supervisor
(``--workers``).

Errors a user can act on are :class:`ConfigError` (usage: exit 2) or :class:`StartError`
(run time: exit 1), each one line; cli.py shows them.
"""

from __future__ import annotations

from socket_echo.config import METRICS_BACKLOG, ServerConfig
from socket_echo.gates.credentials import CredentialsError, check_ciphers, make_credentials
from socket_echo.kinds import kind
from socket_echo.listeners import REUSE_PORT, BindError, BindOptions, adopt_fd, bind_all
from socket_echo.logs import setup_logging
from socket_echo.loops import resolve_loop
from socket_echo.server import run
from socket_echo.tcp.paths import resolve_engine
from socket_echo.udp.paths import resolve_udp_io


class StartError(Exception):
    """The server cannot start (a port in use, a certificate unreadable): one line, exit 1."""


def check_choices(loop: str, engine: str, udp_io: str, tls_ciphers: str = "secure") -> None:
    """A loop or data path this platform lacks, or cipher suites that match nothing:
    ConfigError before anything is bound or made."""
    resolve_loop(loop)
    resolve_engine(engine)
    resolve_udp_io(udp_io)
    check_ciphers(tls_ciphers)


def serve(cfg: ServerConfig) -> int:
    """Bind and serve until a signal; returns the exit code."""
    check_choices(cfg.loop, cfg.engine, cfg.udp_io, cfg.tls_ciphers)
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        credentials = make_credentials(cfg)
    except CredentialsError as exc:
        raise StartError(str(exc)) from None
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
        return run(cfg, bound + fd_bound, credentials, metrics_bound)
    # Imported here: the supervisor brings prometheus_client (its metrics sum), which a single
    # process without --metrics never needs (a fifth of a plain server's import time).
    from socket_echo.supervisors.processes import Supervisor

    # a group's socket is shared: a datagram to a group reaches every socket bound to it
    own = [b for b in bound if reuse and not kind(b.scheme).unix and b.spec.group is None]
    shared = [b for b in bound if b not in own] + fd_bound
    try:
        supervisor = Supervisor(cfg, cfg.workers, shared, own, metrics_bound, credentials)
    except OSError as exc:  # its run directory (TMPDIR)
        where = f" ({exc.filename})" if exc.filename else ""
        raise StartError(f"--workers: no run directory: {exc.strerror or exc}{where}") from None
    return supervisor.run()
