"""Every setting of the server and its default value: the one place defaults live.

The CLI builds a :class:`ServerConfig` from flags and environment variables; the core reads
only this object. Nothing below parses user input except binds.py's parse_bind_url, whose errors
are :class:`ConfigError` with a message fit to show a user as is.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from socket_echo.kinds import DEFAULT_PORT as DEFAULT_PORT
from socket_echo.kinds import kind

if TYPE_CHECKING:  # the parser (impair/params.py) runs in binds.py: config.py imports no parser
    from socket_echo.groups import Group
    from socket_echo.impair.params import Impairments

DEFAULT_HOSTS = ("127.0.0.1", "::1")  # localhost only: safe on a laptop
DEFAULT_BACKLOG = 4096
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_IDLE_TIMEOUT = 300.0
# --max-buffer, on every stream data path: the high-water mark of echo bytes held for one
# connection whose peer has not read them yet. Past it the server reads nothing more from
# that peer until they drain, so at most one read more is ever held: the epoll path reads at
# most min(READ_CHUNK, max_buffer) at a time and stops as soon as anything is held; the
# Protocol path's reads are at most LOOP_READ_SIZE (tcp/protocol.py).
DEFAULT_MAX_BUFFER = 256 * 1024
DEFAULT_GRACEFUL_TIMEOUT = 10.0
DEFAULT_LOG_LEVEL = "info"
DEFAULT_WORKERS = 1  # --workers N|auto ("auto": one per usable core)
PROCESSES_PER_CORE = 4  # --workers and bench --processes: at most this many per usable core
PROCESSES_AT_LEAST = 8  # ... but this many whatever the cores
# Bounds of the numeric options (cli.py): past them a value would hurt, not help.
MAX_SECONDS = 7 * 24 * 3600.0  # any timeout or duration (0 means "never" where it says so)
MAX_RATE = 1e9  # datagrams or requests per second
MAX_BACKLOG = 65535  # listen(): the kernel caps it at net.core.somaxconn anyway
MIN_MAX_BUFFER = 16 * 1024  # --max-buffer: one TLS record (16 KiB) must fit, or TLS stalls
MAX_MAX_BUFFER = 1 << 30
MAX_CONNECTIONS = 1_000_000  # --max-connections, bench --connections
DEFAULT_LOG_FORMAT = "text"
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
# TLS and QUIC handshakes in progress at once, per listener, apart from the connection cap:
# what a flood of handshakes that never finish can hold (a stdlib-loop TLS handshake holds
# about 300 KiB, a uvloop one 50 KiB, an aioquic one 90 KiB; measured).
DEFAULT_MAX_HANDSHAKES = 256
# --tls-ciphers: a preset name or any OpenSSL cipher string (TLS 1.2 suites; TLS 1.3's are
# always the three standard AEAD ones). "secure" is forward secrecy only (ECDHE/DHE), what
# Python's own default allows; "compat" adds the RSA-key-exchange AES-CBC/GCM SHA-2 suites
# that default mbedTLS builds (Zephyr's) offer: lab use with embedded clients.
TLS_CIPHER_PRESETS = {
    "secure": "@SECLEVEL=2:ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:DHE+AES:"
    "!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM",
    "compat": "@SECLEVEL=2:ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:DHE+AES:"
    "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:"
    "!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM",
}
DEFAULT_TLS_CIPHERS = "secure"
PROXY_HEADER_TIMEOUT = 5.0  # --proxy-header-timeout: a PROXY header is complete within it
DEFAULT_UDP_RATE = 1000.0  # datagrams/s per source prefix (/24, /56)
DEFAULT_UDP_BURST = 2000
DEFAULT_UDP_MAX_RATE = 50_000.0  # datagrams/s over all sources
DEFAULT_UDP_MAX_SOURCES = 65536  # rate-limit buckets (source prefixes) kept in memory

# -- choices: the event loops and the data paths, each with what "auto" picks ----------------
# name -> (choices, default). "auto" resolves where the choice is made (loops.py,
# tcp/__init__.py, udp/__init__.py): the fastest the platform has, else the portable one.
CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "loop": (("auto", "asyncio", "uvloop"), "auto"),  # auto: uvloop where installed
    # TCP data path; auto: native where the extension loaded, else epoll (Linux), else protocol
    "engine": (("auto", "native", "epoll", "protocol"), "auto"),
    # UDP data path; auto: native where the extension loaded, else mmsg (Linux), else loop
    "udp_io": (("auto", "native", "mmsg", "loop"), "auto"),
    "log_level": (("debug", "info", "warning", "error", "critical"), DEFAULT_LOG_LEVEL),
    "log_format": (("text", "json"), DEFAULT_LOG_FORMAT),
}
LOOPS, DEFAULT_LOOP = CHOICES["loop"]
ENGINES, DEFAULT_ENGINE = CHOICES["engine"]
UDP_IO, DEFAULT_UDP_IO = CHOICES["udp_io"]
LOG_LEVELS = CHOICES["log_level"][0]
LOG_FORMATS = CHOICES["log_format"][0]
# dtls:// (servers/dtls.py): Zephyr's echo_server with overlay-tls.conf speaks DTLS 1.2 on UDP 4242.
DTLS_MTU = 1200  # bytes per handshake datagram: fits the IPv6 minimum MTU (1280) with headers
DTLS_COOKIE_LIFETIME = 60.0  # seconds a HelloVerifyRequest cookie secret is current
# quic:// (servers/quic.py): Zephyr's QUIC echo uses port 4422 and ALPN "echo-quic".
DEFAULT_QUIC_ALPN = ("echo-quic",)
DEFAULT_QUIC_MAX_STREAMS = 128  # bidirectional streams a peer may have open at once
DEFAULT_QUIC_MAX_DATA = 1 << 20  # connection flow-control window, bytes
DEFAULT_QUIC_MAX_STREAM_DATA = 256 << 10  # per-stream window, bytes

# -- tunables: fixed values the code relies on, kept here so each is set in one place ---------
READ_CHUNK = 64 * 1024  # epoll path: bytes per recv (256 KiB reads stream slower, measured)
LOOP_READ_SIZE = 256 * 1024  # Protocol path: the most one read of either event loop delivers
ACCEPT_BATCH = 128  # accept() calls per readiness event at most
ACCEPT_RETRY_DELAY = 0.25  # out of descriptors: look again after this long (or on a close)
CLOSE_WAIT = 1.0  # after the graceful timeout: time to deliver what is owed before a reset
UDP_BATCH = 64  # datagrams per readiness event (and per recvmmsg) at most
UDP_REPORT_EVERY = 10.0  # UDP drops are logged at most this often, as one line
METRICS_BACKLOG = 64  # listen() backlog of the metrics endpoint
METRICS_MAX_CONNECTIONS = 16  # ... its connections at once (kept out of the descriptor budget)
WORKER_METRICS_BACKLOG = 16  # ... of each worker's private metrics socket
HTTP_MAX_REQUEST = 8192  # metrics endpoint: bytes of request head at most
HTTP_REQUEST_TIMEOUT = 5.0  # ... and seconds for it to arrive
RESTART_DELAY = 0.5  # --workers: first restart of a dead worker; doubles with each quick death
RESTART_MAX_DELAY = 30.0
STABLE_AFTER = 30.0  # a worker that lived this long starts the doubling afresh
READY_TIMEOUT = 15.0  # how long the supervisor waits for its first workers to be ready
SCRAPE_TIMEOUT = 2.0  # the supervisor's /metrics waits this long for each worker at most
WORKER_CHECK_EVERY = 1.0  # the supervisor asks each worker's /healthz this often
WORKER_CHECK_TIMEOUT = 0.5  # ... and takes no answer within this as "not answering"


class ConfigError(ValueError):
    """A user's mistake in the configuration; its message is one line naming the cause."""


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
    """One address to listen on: ``tcp://HOST:PORT``, ``udp://HOST:PORT``, ``unix:///PATH``."""

    scheme: str
    host: str
    port: int
    path: str = ""
    impair: Impairments | None = None  # from the URL's query: binds.py, impair/params.py
    group: Group | None = None  # a multicast group to join (groups.py): ?iface=, ?source=

    @property
    def url(self) -> str:
        url = format_url(self.scheme, self.host, self.port, self.path)
        query = self.group.query() if self.group else ""
        return f"{url}?{query}" if query else url


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    listeners: tuple[ListenerSpec, ...] = tuple(
        ListenerSpec(scheme, host, DEFAULT_PORT)
        for scheme in ("tcp", "udp")
        for host in DEFAULT_HOSTS
    )
    backlog: int = DEFAULT_BACKLOG
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # 0 = never
    max_buffer: int = DEFAULT_MAX_BUFFER
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    loop: str = DEFAULT_LOOP
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = DEFAULT_LOG_FORMAT
    access_log: bool = True
    engine: str = DEFAULT_ENGINE
    udp_rate: float = DEFAULT_UDP_RATE
    udp_burst: int = DEFAULT_UDP_BURST
    udp_max_rate: float = DEFAULT_UDP_MAX_RATE
    udp_allow_privileged_ports: bool = False
    udp_max_sources: int = DEFAULT_UDP_MAX_SOURCES
    udp_io: str = DEFAULT_UDP_IO
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_self_signed: bool = False
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    tls_ciphers: str = DEFAULT_TLS_CIPHERS
    quic_alpn: tuple[str, ...] = DEFAULT_QUIC_ALPN
    quic_retry: bool = False
    quic_max_streams: int = DEFAULT_QUIC_MAX_STREAMS
    quic_max_data: int = DEFAULT_QUIC_MAX_DATA
    quic_max_stream_data: int = DEFAULT_QUIC_MAX_STREAM_DATA
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    proxy_header_timeout: float = PROXY_HEADER_TIMEOUT
    metrics: ListenerSpec | None = None  # HTTP /metrics /healthz /readyz; None = off
    workers: int = DEFAULT_WORKERS  # processes serving the listeners (supervisors/ when > 1)
    fds: tuple[int, ...] = ()  # inherited listening sockets (--fd, socket activation)

    def __post_init__(self) -> None:
        """The rules of a config however it is made, by the CLI or by a program: ports in
        range, ALPN names RFC 7301 allows (ConfigError, one line), and what follows from the
        rest: the log level is lower case, and a connection's log lines (access_log) are
        written only at a level that shows them. The choices a platform may lack (loop, data
        paths, cipher suites) are main.check_choices', run once before anything is bound."""
        for spec in self.listeners:
            if not kind(spec.scheme).unix:
                check_port(spec.port)
        check_alpn(self.quic_alpn)
        level = self.log_level.lower()
        object.__setattr__(self, "log_level", level)
        object.__setattr__(self, "access_log", self.access_log and level in ACCESS_LOG_LEVELS)


def format_url(scheme: str, host: str, port: int, path: str = "") -> str:
    """The one way addresses are written: tcp://h:p, tcp://[v6]:p, unix:///path."""
    if kind(scheme).unix:
        return f"{scheme}://{path}"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


ACCESS_LOG_LEVELS = ("debug", "info")  # the levels a connection's open and close lines show at


def check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range (0-65535)")
    return port


def check_alpn(names: tuple[str, ...], flag: str = "--quic-alpn") -> tuple[str, ...]:
    """``--quic-alpn`` (or the tools' ``--alpn``): each name 1 to 255 bytes (RFC 7301);
    ConfigError otherwise."""
    for name in names:
        if not 0 < len(name.encode()) <= 255:
            raise ConfigError(f"{flag} {name!r}: an ALPN name is 1 to 255 bytes")
    return names
