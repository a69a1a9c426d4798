"""The ``socket-echo`` command line: parse and validate, then hand a Config to the core.

Every flag is also an environment variable ``SOCKET_ECHO_<FLAG>``; the command line wins.
User mistakes end in one line on stderr and exit 2 (usage) or 1 (run time), never a traceback.
"""

from __future__ import annotations

import ipaddress
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from socket_echo import __version__, binds, config
from socket_echo.config import ConfigError, ServerConfig
from socket_echo.exits import FAILED, USAGE, error_line
from socket_echo.logs import quiet_aioquic
from socket_echo.supervisors.cpu import check_process_count, cpu_count, worker_count
from socket_echo.tools.defaults import (
    ARRIVALS,
    DEFAULT_CONNECTIONS,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_DURATION,
    DEFAULT_IN_FLIGHT,
    DEFAULT_SIZE,
    DEFAULT_STREAM_SIZE,
    DEFAULT_TIMEOUT,
    ECHO_FLOOR_RATE,
    MAX_IN_FLIGHT,
    MAX_SEGMENTS,
    MAX_SIZE,
    MIN_EFFECT,
    MODES,
)

ENV_PREFIX = "SOCKET_ECHO_"
LEAST_SECONDS = 0.001  # the shortest timeout or duration other than 0 (a millisecond)
LEAST_RATE = 0.01  # the smallest rate other than 0, per second
F = TypeVar("F", bound=Callable[..., Any])


def env(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


class ByteSize(click.ParamType):  # type: ignore[type-arg]
    """A byte count: ``262144``, ``256k``, ``256KiB``, ``1M``, ``1MiB``."""

    name = "BYTES"
    _units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

    def __init__(self, minimum: int = 1, maximum: int = 1 << 30) -> None:
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            size = value
        else:
            m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
            if not m:
                self.fail(f"{value!r} is not a byte size (e.g. 262144, 256KiB, 1MiB)", param, ctx)
            size = int(m.group(1)) * self._units[m.group(2).lower()]
        if not self.minimum <= size <= self.maximum:
            self.fail(
                f"{value!r} is not between {show_size(self.minimum)} and {show_size(self.maximum)}",
                param,
                ctx,
            )
        return size


def show_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


class Finite(click.FloatRange):
    """A number in a range, and finite: click's FloatRange takes "nan" (it compares false
    with every bound, so it passed any range and lifted the limits it set) and "inf".
    ``least``: the smallest value other than 0 that means something (1e-300 s is no timeout,
    1e-300 req/s no rate: such values ran and measured nothing)."""

    def __init__(self, *args: Any, least: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.least = least

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = float(super().convert(value, param, ctx))  # "nan" is in range for click
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if 0 < number < self.least:
            zero = " (or 0)" if self.min == 0 and not self.min_open else ""
            self.fail(f"{value!r} is too small to mean anything: at least {self.least:g}{zero}")
        return number


def _processes(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """bench ``--processes``: at most the bound ``--workers`` has, before anything forks."""
    if value is None:
        return None
    try:
        return check_process_count("--processes", value)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


class GroupedCommand(click.Command):
    """``--help`` with options under headings (``help_group`` on each option)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                group = getattr(param, "help_group", "Other")
                groups.setdefault(group, []).append(record)
        for name, rows in groups.items():
            with formatter.section(name):
                formatter.write_dl(rows)


class GroupedOption(click.Option):
    def __init__(self, param_decls: list[str], help_group: str = "Other", **kwargs: Any) -> None:
        flag = next(d for d in param_decls if d.startswith("--")).split("/")[0][2:]
        kwargs.setdefault("envvar", env(flag))
        kwargs.setdefault("show_envvar", True)
        super().__init__(param_decls, **kwargs)
        self.help_group = help_group

    def get_error_hint(self, ctx: click.Context | None) -> str:
        """The flag, and its variable only when the value came from it (click names the
        variable whenever it is shown in --help: '--port nan' blamed SOCKET_ECHO_PORT)."""
        hint = click.Parameter.get_error_hint(self, ctx)
        source = ctx.get_parameter_source(self.name) if ctx is not None and self.name else None
        if source is click.core.ParameterSource.ENVIRONMENT:
            hint += f" (from {self.envvar})"
        return hint


def option(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    return click.option(*args, cls=GroupedOption, **kwargs)


class DefaultGroup(click.Group):
    """``socket-echo`` alone, or with only serve flags, means ``socket-echo serve``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "--version")):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="socket-echo")
def cli() -> None:
    """socket-echo: an echo server (RFC 862) and the tools to test any echo server.

    With no command, runs `serve`: TCP echo on localhost port 4242.
    """


LISTEN, LIMITS, UDP, TLS, RUNTIME = "Listeners", "Limits", "UDP", "TLS", "Runtime and logging"


@cli.command(cls=GroupedCommand)
@option(
    "--host",
    multiple=True,
    metavar="HOST",
    help_group=LISTEN,
    help="Address to listen on; repeatable. Default: 127.0.0.1 and ::1 (localhost only). "
    "'::' = all addresses, IPv4 and IPv6 on one socket.",
)
@option(
    "--port",
    type=int,
    default=config.DEFAULT_PORT,
    show_default=True,
    help_group=LISTEN,
    help="TCP port; 0 picks a free one (logged).",
)
@option(
    "--bind",
    multiple=True,
    metavar="URL",
    help_group=LISTEN,
    help="Listener URL, repeatable: tcp://HOST:PORT, udp://, tls://, tcp+proxy://, "
    "tls+proxy:// (PROXY protocol first), quic:// (QUIC v1, e.g. quic://0.0.0.0:4422), "
    "tcp://[::1]:4242, unix:///path/to/socket; impairments as a query (?delay=80ms). "
    "Replaces --host/--port (which give TCP and UDP) when given.",
)
@option(
    "--fd",
    "fds",
    type=click.IntRange(min=0),
    multiple=True,
    metavar="N",
    help_group=LISTEN,
    help="Serve an inherited socket (systemd socket activation: 3, 4, ...); repeatable. "
    "TCP, UDP or Unix stream, as the socket is. Replaces --host/--port unless --bind is given.",
)
@option(
    "--backlog",
    type=click.IntRange(min=1, max=config.MAX_BACKLOG),
    default=config.DEFAULT_BACKLOG,
    show_default=True,
    help_group=LISTEN,
    help="listen() backlog (the OS caps it).",
)
@option(
    "--max-connections",
    type=click.IntRange(min=1, max=config.MAX_CONNECTIONS),
    default=config.DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    help_group=LIMITS,
    help="Open connections at most; newer ones are closed at once.",
)
@option(
    "--idle-timeout",
    type=Finite(min=0, max=config.MAX_SECONDS, least=LEAST_SECONDS),
    default=config.DEFAULT_IDLE_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help_group=LIMITS,
    help="Close a connection with no traffic (or whose peer stopped reading) this long; 0 = never.",
)
@option(
    "--max-buffer",
    type=ByteSize(config.MIN_MAX_BUFFER, config.MAX_MAX_BUFFER),
    default=config.DEFAULT_MAX_BUFFER,
    show_default=True,
    help_group=LIMITS,
    help="High-water mark of echo bytes held for a peer that is not reading: past it the "
    "server stops reading from that peer until they drain (every data path; at most one "
    "more read, <= 256 KiB, is held beyond it).",
)
@option(
    "--graceful-timeout",
    type=Finite(min=0, max=config.MAX_SECONDS, least=LEAST_SECONDS),
    default=config.DEFAULT_GRACEFUL_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help_group=LIMITS,
    help="On SIGTERM/SIGINT, time open connections get to finish.",
)
@option(
    "--udp-rate",
    type=Finite(min=0, min_open=True, max=config.MAX_RATE, least=LEAST_RATE),
    default=config.DEFAULT_UDP_RATE,
    show_default=True,
    metavar="PPS",
    help_group=UDP,
    help="Datagrams/s answered per source prefix (/24 IPv4, /56 IPv6); excess is dropped.",
)
@option(
    "--udp-burst",
    type=click.IntRange(min=1, max=int(config.MAX_RATE)),
    default=config.DEFAULT_UDP_BURST,
    show_default=True,
    metavar="N",
    help_group=UDP,
    help="Datagrams a source prefix may send at once above its rate.",
)
@option(
    "--udp-max-rate",
    type=Finite(min=0, min_open=True, max=config.MAX_RATE, least=LEAST_RATE),
    default=config.DEFAULT_UDP_MAX_RATE,
    show_default=True,
    metavar="PPS",
    help_group=UDP,
    help="Datagrams/s answered over all sources: a token bucket that holds one second's "
    "worth, so after a quiet spell the first second can answer up to twice this.",
)
@option(
    "--udp-max-sources",
    type=click.IntRange(min=16, max=config.MAX_CONNECTIONS * 16),
    default=config.DEFAULT_UDP_MAX_SOURCES,
    show_default=True,
    metavar="N",
    help_group=UDP,
    help="Source prefixes whose rate is tracked at once; the least recently seen go first "
    "(bounds memory under a spoofed flood).",
)
@option(
    "--udp-allow-privileged-ports/--no-udp-allow-privileged-ports",
    default=False,
    show_default=True,
    help_group=UDP,
    help="Answer sources on ports below 1024 (labs only: a reflection risk).",
)
@option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help_group=TLS,
    help="Certificate chain (PEM) for tls:// listeners.",
)
@option(
    "--tls-key",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help_group=TLS,
    help="Private key (PEM) for --tls-cert.",
)
@option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help_group=TLS,
    help="Mutual TLS: require client certificates signed by this CA (PEM).",
)
@option(
    "--tls-self-signed/--no-tls-self-signed",
    default=False,
    help_group=TLS,
    help="Make a certificate for localhost at start (in memory) and log its SHA-256 "
    "fingerprint: a quick try without files.",
)
@option(
    "--max-handshakes",
    type=click.IntRange(min=1, max=100_000),
    default=config.DEFAULT_MAX_HANDSHAKES,
    show_default=True,
    help_group=TLS,
    help="tls://, tls+proxy://, quic://: handshakes in progress at once per listener; a TLS "
    "connection beyond it is reset and a QUIC Initial dropped (both counted). Apart from "
    "--max-connections, which a connection joins once its handshake is done (QUIC) or begun (TLS).",
)
@option(
    "--tls-handshake-timeout",
    type=Finite(min=0, min_open=True, max=config.MAX_SECONDS, least=LEAST_SECONDS),
    default=config.DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help_group=TLS,
    help="Close connections whose TLS handshake takes longer.",
)
@option(
    "--quic-alpn",
    multiple=True,
    metavar="NAME",
    help_group=TLS,
    help="quic:// ALPN, repeatable; replaces the default echo-quic (Zephyr's and net-tools').",
)
@option(
    "--quic-retry/--no-quic-retry",
    default=False,
    show_default=True,
    help_group=TLS,
    help="quic://: validate client addresses with a Retry before any handshake work.",
)
@option(
    "--quic-max-streams",
    type=click.IntRange(min=1, max=config.MAX_CONNECTIONS),
    default=config.DEFAULT_QUIC_MAX_STREAMS,
    show_default=True,
    help_group=TLS,
    help="quic://: bidirectional streams a client may have open at once.",
)
@option(
    "--quic-max-data",
    type=ByteSize(),
    default=config.DEFAULT_QUIC_MAX_DATA,
    show_default=True,
    help_group=TLS,
    help="quic://: connection flow-control window.",
)
@option(
    "--quic-max-stream-data",
    type=ByteSize(),
    default=config.DEFAULT_QUIC_MAX_STREAM_DATA,
    show_default=True,
    help_group=TLS,
    help="quic://: flow-control window of each stream.",
)
@option(
    "--tls-ciphers",
    default=config.DEFAULT_TLS_CIPHERS,
    show_default=True,
    metavar="secure|compat|STRING",
    help_group=TLS,
    help="TLS 1.2 cipher suites: secure (forward secrecy only), compat (adds the RSA key "
    "exchange AES-CBC/GCM SHA-2 suites of default mbedTLS builds, as Zephyr's clients offer; "
    "for labs), or any OpenSSL cipher string. The start-up log names the suites.",
)
@option(
    "--proxy-header-timeout",
    type=Finite(min=0, min_open=True, max=config.MAX_SECONDS, least=LEAST_SECONDS),
    default=config.PROXY_HEADER_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help_group=LIMITS,
    help="tcp+proxy:// and tls+proxy://: close connections whose PROXY header is not "
    "complete by then.",
)
@option(
    "--loop",
    type=click.Choice(config.LOOPS),
    default=config.DEFAULT_LOOP,
    show_default=True,
    help_group=RUNTIME,
    help="Event loop; auto = uvloop where installed.",
)
@option(
    "--engine",
    type=click.Choice(config.ENGINES),
    default=config.DEFAULT_ENGINE,
    show_default=True,
    help_group=RUNTIME,
    help="TCP data path: native (the ready loop in C, Linux, fastest), epoll (pure Python, "
    "Linux), protocol (asyncio Protocol, any OS); auto = the first of these available. "
    "SOCKET_ECHO_NO_EXTENSIONS=1 rules out native.",
)
@option(
    "--workers",
    default=str(config.DEFAULT_WORKERS),
    show_default=True,
    metavar="N|auto",
    help_group=RUNTIME,
    help="Worker processes sharing the listeners (SO_REUSEPORT), restarted if they die; "
    "auto = one per core.",
)
@option(
    "--udp-io",
    type=click.Choice(config.UDP_IO),
    default=config.DEFAULT_UDP_IO,
    show_default=True,
    help_group=RUNTIME,
    help="UDP data path: native (recvmmsg/sendmmsg and the guard in C, Linux, fastest), mmsg "
    "(the same batches from Python, Linux), loop (recvfrom/sendto, any OS); auto = the first "
    "of these available.",
)
@option(
    "--metrics",
    metavar="HOST:PORT",
    help_group=RUNTIME,
    help="Serve /metrics (Prometheus), /healthz and /readyz over HTTP here. Off by default.",
)
@option(
    "--log-level",
    type=click.Choice(config.LOG_LEVELS, case_sensitive=False),
    default=config.DEFAULT_LOG_LEVEL,
    show_default=True,
    help_group=RUNTIME,
    help="warning hides the per-connection lines.",
)
@option(
    "--log-format",
    type=click.Choice(config.LOG_FORMATS),
    default=config.DEFAULT_LOG_FORMAT,
    show_default=True,
    help_group=RUNTIME,
    help="text lines, or one JSON object per line.",
)
@option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help_group=RUNTIME,
    help="A log line per connection opened and closed (at info level).",
)
def serve(
    host: tuple[str, ...],
    port: int,
    bind: tuple[str, ...],
    fds: tuple[int, ...],
    backlog: int,
    max_connections: int,
    idle_timeout: float,
    max_buffer: int,
    graceful_timeout: float,
    udp_rate: float,
    udp_burst: int,
    udp_max_rate: float,
    udp_max_sources: int,
    udp_allow_privileged_ports: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    tls_self_signed: bool,
    max_handshakes: int,
    tls_handshake_timeout: float,
    quic_alpn: tuple[str, ...],
    quic_retry: bool,
    quic_max_streams: int,
    quic_max_data: int,
    quic_max_stream_data: int,
    tls_ciphers: str,
    proxy_header_timeout: float,
    loop: str,
    engine: str,
    workers: str,
    udp_io: str,
    metrics: str | None,
    log_level: str,
    log_format: str,
    access_log: bool,
) -> None:
    """Echo every byte received back to its sender until the client closes."""
    try:
        if bind:
            listeners = tuple(binds.parse_bind_url(url) for url in bind)
        elif fds:
            listeners = ()
        else:
            listeners = binds.listeners_from_hosts(host, port)
        metrics_spec = binds.parse_metrics_address(metrics) if metrics else None
        worker_total = worker_count(workers)
        cfg = ServerConfig(
            listeners=listeners,
            backlog=backlog,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            max_buffer=max_buffer,
            graceful_timeout=graceful_timeout,
            udp_rate=udp_rate,
            udp_burst=udp_burst,
            udp_max_rate=udp_max_rate,
            udp_max_sources=udp_max_sources,
            udp_allow_privileged_ports=udp_allow_privileged_ports,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            tls_self_signed=tls_self_signed,
            max_handshakes=max_handshakes,
            tls_handshake_timeout=tls_handshake_timeout,
            tls_ciphers=tls_ciphers,
            quic_alpn=quic_alpn or config.DEFAULT_QUIC_ALPN,
            quic_retry=quic_retry,
            quic_max_streams=quic_max_streams,
            quic_max_data=quic_max_data,
            quic_max_stream_data=quic_max_stream_data,
            proxy_header_timeout=proxy_header_timeout,
            loop=loop,
            engine=engine,
            udp_io=udp_io,
            workers=worker_total,
            fds=fds,
            metrics=metrics_spec,
            log_level=log_level,
            log_format=log_format,
            access_log=access_log,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    # the server's modules only for serve: the tools' start-up stays light (a CI job or a
    # test suite starts bench, probe and client hundreds of times)
    from socket_echo.main import StartError
    from socket_echo.main import serve as serve_config

    try:
        code = serve_config(cfg)  # main.check_choices first: a path this platform lacks, exit 2
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except StartError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    quiet_aioquic()  # every command: the server's close records and the tools' one-line errors
    try:
        cli.main(args=argv, prog_name="socket-echo", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(FAILED)
    except click.UsageError as exc:
        click.echo(error_line(exc.format_message()), err=True)
        sys.exit(USAGE)
    except click.ClickException as exc:
        click.echo(error_line(exc.format_message()), err=True)
        sys.exit(FAILED)


# -- client tools ----------------------------------------------------------------------------

TARGET_HELP = (
    "TARGET is HOST[:PORT] (port 4242), [IPV6]:PORT, or a tcp:// udp:// tls:// unix:// "
    "quic:// (port 4422) dtls:// URL."
)


def _exit_with(run: Callable[[], int]) -> None:
    """Run a tool and exit with its code; a ToolError is its one line (exits.py)."""
    from socket_echo.exits import ToolError

    try:
        code = run()
    except ToolError as exc:
        click.echo(error_line(str(exc)), err=True)
        code = exc.code
    sys.exit(code)


def _target(text: str, udp: bool, tls: bool) -> Any:
    from socket_echo.tools.connect.target import TargetError, parse_target

    if udp and tls:
        raise click.UsageError("--udp and --tls exclude each other")
    try:
        return parse_target(text, "udp" if udp else "tls" if tls else None)
    except TargetError as exc:
        raise click.UsageError(str(exc)) from None


def _tls_options(
    ca: str | None,
    insecure: bool,
    server_name: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> Any:
    from socket_echo.tools.connect.target import TlsOptions

    if key and not cert:
        raise click.BadParameter("needs --cert", param_hint="--key")
    return TlsOptions(ca, insecure, server_name, cert, key)


def _server_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--server-name``: an address, or a host name IDNA can encode (as SNI needs)."""
    if value is None:
        return None
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    try:
        if value and value.encode("idna"):
            return value
    except UnicodeError:
        pass
    raise click.BadParameter(f"{value!r} is not a host name or an address")


def _alpn(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--alpn``: one name of 1 to 255 bytes, as the server's ``--quic-alpn``."""
    try:
        return config.check_alpn((value,), "--alpn")[0]
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


_expect_responders = click.option(
    "--expect-responders",
    type=click.IntRange(min=1, max=100_000),
    default=None,
    metavar="N",
    help="A multicast group (udp://GROUP:PORT?iface=NAME): probe fails when fewer than N "
    "members answer; bench sends each next datagram once N answered (default: every member "
    "seen so far) or the timeout passed.",
)


def transport_options(f: F) -> F:
    """The target's transport, for client, probe and bench alike."""
    f = click.option(
        "--alpn",
        default=config.DEFAULT_QUIC_ALPN[0],
        show_default=True,
        callback=_alpn,
        help="quic://: the ALPN to offer (Zephyr's QUIC echo uses echo-quic).",
    )(f)
    f = click.option(
        "--server-name",
        metavar="NAME",
        callback=_server_name,
        help="TLS, DTLS, QUIC: the name to verify the certificate for (and send as SNI) "
        "[default: the target's host]; net-tools' certificates are for localhost.",
    )(f)
    f = click.option("--insecure", is_flag=True, help="TLS: do not verify the certificate.")(f)
    f = click.option(
        "--ca", type=click.Path(exists=True, dir_okay=False), help="TLS: trust this CA file (PEM)."
    )(f)
    f = click.option("--tls", is_flag=True, help="TLS to a HOST:PORT target.")(f)
    f = click.option("--udp", is_flag=True, help="UDP to a HOST:PORT target.")(f)
    return f


@cli.command(epilog=TARGET_HELP)
@click.argument("target")
@transport_options
@click.option(
    "--timeout",
    type=Finite(min=0.1, max=config.MAX_SECONDS),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Connect timeout and the silence allowed; each byte sent is due back within it plus "
    f"1 s per {ECHO_FLOOR_RATE >> 10} KiB owed ahead of it.",
)
def client(
    target: str,
    udp: bool,
    tls: bool,
    ca: str | None,
    insecure: bool,
    server_name: str | None,
    timeout: float,
    alpn: str,
) -> None:
    """Talk to an echo server: line mode on a terminal, binary-safe pipe otherwise (quic://:
    a pipe over one stream; dtls://: one record per line, or per 1 KiB from a pipe). Exit 0
    when every byte came back as sent, 1 when not (wrong, missing or too slow), 2 when no
    connection or handshake could be made."""
    from socket_echo.tools.client import run as tool

    t = _target(target, udp, tls)
    _exit_with(lambda: tool.main(t, _tls_options(ca, insecure, server_name), timeout, alpn))


@cli.command(epilog=TARGET_HELP)
@click.argument("target")
@transport_options
@click.option(
    "--timeout",
    type=Finite(min=0.1, max=config.MAX_SECONDS),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Each step's silence allowed (as net-tools' echo-client) and its deadline: this plus "
    f"1 s per {ECHO_FLOOR_RATE >> 10} KiB the step sends.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quick", is_flag=True, help="One short round trip; exit code only.")
@click.option(
    "--require-concurrency",
    is_flag=True,
    help="Fail (not just report) a server that serves one client at a time.",
)
@_expect_responders
def probe(
    target: str,
    udp: bool,
    tls: bool,
    ca: str | None,
    insecure: bool,
    server_name: str | None,
    timeout: float,
    as_json: bool,
    quick: bool,
    require_concurrency: bool,
    expect_responders: int | None,
    alpn: str,
) -> None:
    """Check that any echo server conforms. Exit 0 passed, 1 failed, 2 unreachable
    (--quick too). A multicast group: every member that answers, and what each got right."""
    from socket_echo.tools.probe import run as tool

    t = _target(target, udp, tls)
    if expect_responders and t.group is None:
        raise click.BadParameter(
            "is for a multicast group target", param_hint="--expect-responders"
        )
    options = _tls_options(ca, insecure, server_name)
    _exit_with(
        lambda: tool.main(
            t, timeout, options, alpn, quick, require_concurrency, as_json, expect_responders or 0
        )
    )


def _segment(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    """``--segment I/N``: this run is part I (from 0) of a run spread over N."""
    match = re.fullmatch(r"(\d+)/(\d+)", value.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)) <= MAX_SEGMENTS:
        raise click.BadParameter(
            f"{value!r}: give I/N with 0 <= I < N <= {MAX_SEGMENTS} (e.g. 0/4)"
        )
    return int(match.group(1)), int(match.group(2))


def _start_at(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``--start-at``: Unix seconds or ISO 8601 (a zone, or UTC); not past, not a day away."""
    if value is None:
        return None
    import datetime

    try:
        when = float(value)
    except ValueError:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is neither Unix seconds nor ISO 8601 (2026-12-03T10:00:00Z)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        when = moment.timestamp()
    now = time.time()
    if not math.isfinite(when):
        raise click.BadParameter(f"{value!r} is not a time")
    if when <= now:
        raise click.BadParameter(
            f"{value!r} is already past ({now - when:,.1f} s ago): every segment must start "
            "together, so give a time still to come"
        )
    if when - now > MAX_START_WAIT:
        raise click.BadParameter(f"{value!r} is more than a day away")
    return when


MAX_START_WAIT = 24 * 3600.0


OUTPUTS = (  # where bench and report write their figures
    ("--json", "json_file", "Write the results (histograms included: report adds them) to "
     "FILE ('-' = stdout)."),
    ("--plot", "plot_file", "Draw the latency percentile curve to FILE.png (needs matplotlib)."),
    ("--hgrm", "hgrm_file", "Write HdrHistogram's percentile distribution (µs) to FILE ('-' = "
     "stdout)."),
)  # fmt: skip


def _slo_option(f: F) -> F:
    return click.option(
        "--slo",
        "slos",
        multiple=True,
        metavar="EXPR",
        help="An objective, repeatable: p99<2ms, p50<=500us, p99.9<10ms, errors==0, "
        "rps>=20000, late_sends<1%. Missed on a clean run: exit 3.",
    )(f)


def _objectives(slos: tuple[str, ...], group: bool | None = None) -> Any:
    """Every --slo parsed before anything starts (one line, exit 2); ``group``: bench's target
    is (or is not) a multicast group, None for report (its files say)."""
    from socket_echo.tools.bench.slo import for_run, parse

    try:
        objectives = tuple(parse(text) for text in slos)
        return objectives if group is None else for_run(objectives, group)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _outputs(f: F) -> F:
    for flag, name, text in reversed(OUTPUTS):
        f = click.option(flag, name, type=click.Path(dir_okay=False, writable=True), help=text)(f)
    return f


def _outputs_checked(json_file: str | None, plot_file: str | None, hgrm_file: str | None) -> Any:
    """The files asked for, checked before the run (one line, exit 2)."""
    from socket_echo.tools.bench.output import OutputError, Outputs

    outputs = Outputs(json_file, plot_file, hgrm_file)
    try:
        outputs.check()
    except OutputError as exc:
        raise click.UsageError(str(exc)) from None
    return outputs


@cli.command(epilog=TARGET_HELP)
@click.argument("target")
@transport_options
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="pingpong",
    show_default=True,
    help="pingpong: one message in flight per connection (open loop: up to --in-flight); "
    "stream: both ways at once; churn: connect, echo, close; udp: datagram ping-pong.",
)
@click.option(
    "--connections",
    "-c",
    type=click.IntRange(min=1, max=config.MAX_CONNECTIONS),
    default=DEFAULT_CONNECTIONS,
    show_default=True,
    help="Connections of the whole run (with --segment: of every segment together).",
)
@click.option(
    "--size",
    "-s",
    type=click.IntRange(min=1, max=MAX_SIZE),
    default=None,
    help=f"Bytes per message; per write in stream mode [default: {DEFAULT_SIZE}; stream: "
    f"{DEFAULT_STREAM_SIZE}].",
)
@click.option(
    "--duration",
    "-d",
    type=Finite(min=0.1, max=config.MAX_SECONDS),
    default=DEFAULT_DURATION,
    show_default=True,
    metavar="SECONDS",
    help="Measured time, after the warm-up.",
)
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(min=1),
    default=None,
    callback=_processes,
    help="Load generator processes [default: all cores].",
)
@click.option(
    "--rate",
    type=Finite(min=0, max=config.MAX_RATE, least=LEAST_RATE),
    default=0.0,
    help="Open loop: requests/s of the whole run; latency counts from each intended send "
    "time (corrected) and from the actual send (uncorrected).",
)
@click.option(
    "--arrival",
    type=click.Choice(ARRIVALS),
    default="uniform",
    show_default=True,
    help="Open loop: even gaps between requests, or Poisson arrivals (no synchronised bursts).",
)
@click.option(
    "--in-flight",
    type=click.IntRange(min=1, max=MAX_IN_FLIGHT),
    default=DEFAULT_IN_FLIGHT,
    show_default=True,
    help="Open loop: requests in flight per connection at most (echoes matched by position).",
)
@click.option(
    "--probe-rate",
    type=Finite(min=0, max=100_000, least=LEAST_RATE),
    default=0.0,
    metavar="R",
    help="stream: also run a 64 B ping-pong at R req/s and measure its latency under the "
    "load (bufferbloat: iperf2's --bounceback-congest).",
)
@click.option(
    "--warmup",
    type=Finite(min=0, max=config.MAX_SECONDS, least=LEAST_SECONDS),
    default=0.0,
    metavar="SECONDS",
    help="Run this long first and leave it out of every figure.",
)
@click.option(
    "--segment",
    default="0/1",
    callback=_segment,
    metavar="I/N",
    help="Run part I (from 0) of a load spread over N machines: connections and rate "
    "divided so the N parts sum to the whole; add the results with 'socket-echo report'.",
)
@click.option(
    "--start-at",
    callback=_start_at,
    metavar="TIME",
    help="Start the load at TIME (Unix seconds or ISO 8601), so segments start together.",
)
@click.option(
    "--timeout",
    type=Finite(min=0.1, max=config.MAX_SECONDS),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
)
@click.option(
    "--drain-timeout",
    type=Finite(min=0, max=config.MAX_SECONDS, least=LEAST_SECONDS),
    default=DEFAULT_DRAIN_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="At the end every connection half-closes (FIN) and reads what is still owed until "
    "the peer closes; one that has not closed within this is reset (and counted): a reset "
    "wedges some firmware echo loops.",
)
@click.option(
    "--tls-resume",
    is_flag=True,
    help="--mode churn over tls://: each connection offers the session the one before it got "
    "(resumption); the result counts how many the server resumed.",
)
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="tls://: mutual TLS, the client's certificate (PEM; with its key unless --key).",
)
@click.option(
    "--key", type=click.Path(exists=True, dir_okay=False), metavar="FILE", help="--cert's key."
)
@_expect_responders
@_slo_option
@_outputs
def bench(
    target: str,
    udp: bool,
    tls: bool,
    ca: str | None,
    insecure: bool,
    server_name: str | None,
    mode: str,
    connections: int,
    size: int | None,
    duration: float,
    processes: int | None,
    rate: float,
    arrival: str,
    in_flight: int,
    warmup: float,
    probe_rate: float,
    segment: tuple[int, int],
    start_at: float | None,
    timeout: float,
    drain_timeout: float,
    tls_resume: bool,
    cert: str | None,
    key: str | None,
    expect_responders: int | None,
    slos: tuple[str, ...],
    json_file: str | None,
    plot_file: str | None,
    hgrm_file: str | None,
    alpn: str,
) -> None:
    """Load any echo server and verify every byte. Exit 1 on errors or mismatches, 2 when
    the target is unreachable. A multicast group: every member measured apart."""
    from socket_echo.tools.bench.model import BenchConfig
    from socket_echo.tools.bench.run import run

    try:
        cfg = BenchConfig(
            target=_target(target, udp or mode == "udp", tls),
            mode=mode,
            connections=connections,
            size=size or 0,
            duration=duration,
            processes=processes or cpu_count(),
            rate=rate,
            timeout=timeout,
            tls=_tls_options(ca, insecure, server_name, cert, key),
            alpn=alpn,
            arrival=arrival,
            warmup=warmup,
            in_flight=in_flight,
            segment=segment,
            start_at=start_at,
            probe_rate=probe_rate,
            drain_timeout=drain_timeout,
            expect_responders=expect_responders or 0,
            tls_resume=tls_resume,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    objectives = _objectives(slos, cfg.target.group is not None)
    outputs = _outputs_checked(json_file, plot_file, hgrm_file)
    _exit_with(lambda: run(cfg, outputs, objectives))


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_slo_option
@click.option(
    "--compare",
    "base_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="BASE",
    help="An A/B verdict against the base: its --json file(s) (repeatable; added as FILES "
    "are). Per figure new/base, a 95% interval (bootstrap over whole seconds) and better, "
    "worse or no significant difference.",
)
@click.option(
    "--min-effect",
    type=click.FloatRange(0.0, 10.0),
    default=MIN_EFFECT,
    show_default=True,
    help="With --compare: a significant difference smaller than this share (0.05: 5%) is "
    "not counted.",
)
@click.option(
    "--fail-on-regression",
    is_flag=True,
    help="With --compare: exit 3 when a figure is worse than the base.",
)
@_outputs
def report(
    files: tuple[str, ...],
    slos: tuple[str, ...],
    base_files: tuple[str, ...],
    min_effect: float,
    fail_on_regression: bool,
    json_file: str | None,
    plot_file: str | None,
    hgrm_file: str | None,
) -> None:
    """Add bench results (the --json files of the segments of one run, or of several runs
    of one load): histograms added, counters and rates summed, the window the common one.
    Prints the table a single run prints; exit 1 if any had errors or mismatches. With
    --compare, also how the result differs from a base and whether that is noise."""
    from socket_echo.tools.bench import report as tool

    if (fail_on_regression or min_effect != MIN_EFFECT) and not base_files:
        raise click.UsageError("--fail-on-regression and --min-effect need --compare BASE")
    if not math.isfinite(min_effect):
        raise click.BadParameter("not a number", param_hint="--min-effect")
    objectives = _objectives(slos)
    outputs = _outputs_checked(json_file, plot_file, hgrm_file)
    _exit_with(
        lambda: tool.run(
            list(files), outputs, objectives, base_files, min_effect, fail_on_regression
        )
    )
