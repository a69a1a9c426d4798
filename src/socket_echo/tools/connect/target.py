"""The layer the client tools share: what TARGET means, how to connect, how to verify.

TARGET is ``HOST[:PORT]`` (port 4242 by default), ``[V6]:PORT``, or a URL as in ``--bind``:
``tcp://``, ``udp://``, ``tls://``, ``unix:///path``, ``quic://`` (port 4422 by default, as
Zephyr's QUIC echo), ``dtls://`` (port 4242, as Zephyr's echo_server with overlay-tls.conf).
A multicast group is a ``udp://`` target too: ``udp://239.192.0.2:4242?iface=eth0&ttl=1&loop=0``
(groups.py); every member of the group answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import select
import socket
import ssl
import time
from urllib.parse import urlsplit

from socket_echo.config import DEFAULT_PORT, format_url
from socket_echo.groups import (
    TARGET_OPTIONS,
    Group,
    GroupError,
    ifindex,
    is_multicast,
    prepare_sender,
    split_query,
    target_group,
)
from socket_echo.kinds import KINDS, TARGET_SCHEMES, kind


class TargetError(ValueError):
    """TARGET is malformed; the message names the cause."""


class Unreachable(OSError):
    """Could not connect; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Target:
    scheme: str  # tcp, udp, tls, unix, quic, dtls
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    group: Group | None = None  # a multicast group: every member answers (groups.py)

    @property
    def url(self) -> str:
        return format_url(self.scheme, self.host, self.port, self.path)

    @property
    def stream(self) -> bool:
        return not kind(self.scheme).datagram


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    ca_file: str | None = None
    insecure: bool = False
    server_name: str | None = None
    cert_file: str | None = None  # mutual TLS: the client's certificate (bench --cert)
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """The client context: a ``--ca`` file without a certificate, or a ``--cert``/``--key``
        that does not load, is one line naming it."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except ssl.SSLError as exc:
            # the server's TLS module (asyncio, its listeners) only for this line: every tool
            # imports this module, and a tool's start-up is most of a short run's CPU
            from socket_echo.gates.tls import failure_reason

            raise Unreachable(f"--ca {self.ca_file}: {failure_reason(exc)}") from None
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise Unreachable(f"--cert {self.cert_file}: {reason}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def parse_target(text: str, scheme: str | None = None) -> Target:
    """``HOST[:PORT]``, ``[V6]:PORT`` or a URL; ``scheme`` overrides a bare HOST's tcp."""
    if "://" in text:
        try:  # urlsplit itself checks brackets ("Invalid IPv6 URL") and the address in them
            parts = urlsplit(text)
            parts.hostname  # noqa: B018
        except ValueError as exc:
            raise TargetError(f"malformed {text!r}: {exc}") from None
        if parts.scheme not in TARGET_SCHEMES:
            raise TargetError(
                f"unknown scheme in {text!r} "
                "(use tcp://, udp://, tls://, unix://, quic://, dtls://)"
            )
        if kind(parts.scheme).unix:
            path = parts.netloc + parts.path
            if not path:
                raise TargetError(f"no socket path in {text!r} (unix:///path/to/socket)")
            return Target("unix", path=path)
        try:
            port = parts.port
        except ValueError as exc:
            raise TargetError(f"bad port in {text!r}: {exc}") from None
        if not parts.hostname:
            raise TargetError(f"no host in {text!r}")
        default = kind(parts.scheme).default_port
        group = _group_of(parts.scheme, parts.hostname, parts.query, text)
        return Target(parts.scheme, parts.hostname, default if port is None else port, "", group)
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TargetError(f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise TargetError(f"unexpected {rest!r} after ']' in {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise TargetError(
                f"{text!r}: write IPv6 addresses with a port as [ADDR]:PORT"
            ) from None
    if not host:
        raise TargetError(f"no host in {text!r}")
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise TargetError(f"bad port {port_text!r} in {text!r} (1-65535)")
        port = int(port_text)
    scheme = scheme or "tcp"
    return Target(scheme, host, port, "", _group_of(scheme, host, "", text))


def _group_of(scheme: str, host: str, query: str, text: str) -> Group | None:
    """A multicast target's options (``?iface=&ttl=&loop=``), None for a unicast one."""
    if not kind(scheme).groups:
        if is_multicast(host):
            joins = ", ".join(f"{k.scheme}://" for k in KINDS.values() if k.groups)
            raise TargetError(f"{text!r}: a multicast group is reached over {joins} only")
        return None
    options, rest = split_query(query, TARGET_OPTIONS)
    if rest:
        raise TargetError(f"{text!r}: unknown option(s) {rest!r} (a group takes "
                          f"{', '.join(TARGET_OPTIONS)})")  # fmt: skip
    try:
        return target_group(host, options, text)
    except GroupError as exc:
        raise TargetError(str(exc)) from None


def _family_addresses(target: Target, kind: int) -> list[tuple[int, tuple[object, ...]]]:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=kind)
    except socket.gaierror as exc:
        raise Unreachable(f"{target.url}: unknown host ({exc.strerror})") from None
    return [(info[0], info[4]) for info in infos]


def connect(target: Target, timeout: float, tls: TlsOptions | None = None) -> socket.socket:
    """A connected socket (TLS-wrapped for tls://) with TCP_NODELAY, blocking with timeout."""
    if target.scheme == "udp":
        return udp_socket(target, timeout)
    if target.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target.path)
        except OSError as exc:
            sock.close()
            raise Unreachable(f"{target.url}: {exc.strerror or exc}") from None
        return sock
    last: OSError | None = None
    for family, addr in _family_addresses(target, socket.SOCK_STREAM):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if target.scheme == "tls":
            opts = tls or TlsOptions()
            try:
                context = opts.context()
            except Unreachable:
                sock.close()
                raise
            try:
                return context.wrap_socket(sock, server_hostname=opts.server_name or target.host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise Unreachable(f"{target.url}: TLS handshake failed: {exc}") from None
        return sock
    reason = (
        "timed out"
        if isinstance(last, TimeoutError)
        else (last.strerror if last and last.strerror else str(last))
    )
    raise Unreachable(f"{target.url}: {reason}")


def connect_many(
    target: Target, count: int, wait: float, tls: TlsOptions | None = None
) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections at once (non-blocking), give them ``wait`` seconds;
    returns (connected sockets, how many did not get through). A one-client-at-a-time
    server with a small backlog drops the surplus SYNs: that is a result, not an error."""
    if target.scheme == "tls":  # handshakes are sequential; our TLS servers are concurrent
        socks = []
        for _ in range(count):
            with contextlib.suppress(Unreachable):
                socks.append(connect(target, wait, tls))
        return socks, count - len(socks)
    if target.scheme == "unix":
        family, addr = socket.AF_UNIX, target.path
    else:
        family, addr = _family_addresses(target, socket.SOCK_STREAM)[0]  # type: ignore[assignment]
    pending: dict[int, socket.socket] = {}
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(addr)
        pending[sock.fileno()] = sock
    connected: list[socket.socket] = []
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            sock = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.close()
                continue
            sock.setblocking(True)
            sock.settimeout(wait)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connected.append(sock)
    for sock in pending.values():
        sock.close()
    return connected, count - len(connected)


def group_socket(target: Target, timeout: float) -> tuple[socket.socket, tuple[object, ...]]:
    """An unconnected UDP socket set to send to the target's group (its interface, hop limit
    and loop), and the group's address: answers come from every member, by unicast."""
    assert target.group is not None
    family, addr = _family_addresses(target, socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        prepare_sender(sock, target.group)
    except GroupError as exc:
        sock.close()
        raise Unreachable(f"{target.url}: {exc}") from None
    except OSError as exc:
        sock.close()
        raise Unreachable(f"{target.url}: {exc.strerror or exc}") from None
    if family == socket.AF_INET6 and target.group.iface:
        addr = (addr[0], addr[1], 0, ifindex(target.group.iface))
    sock.settimeout(timeout)
    return sock, addr


def udp_socket(target: Target, timeout: float) -> socket.socket:
    """A UDP socket connect()ed to the target, so only its answers come in."""
    family, addr = _family_addresses(target, socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    sock.connect(addr)
    return sock


ICMP_REFUSED = "refused: ICMP port unreachable (nothing listens there)"


def check_datagrams_reach(target: Target, timeout: float) -> None:
    """One datagram before a UDP run: Unreachable when an ICMP port unreachable answers it
    (nothing listens there). Silence, or an answer, lets the run go on: a peer may drop one
    datagram (a rate limit, a lossy path) and still be there. A group: its socket is set up
    (a missing interface, a hop limit refused: Unreachable), nothing is sent (no ICMP answers
    a multicast datagram; its members are counted by who answers)."""
    if target.group is not None:
        group_socket(target, timeout)[0].close()
        return
    with udp_socket(target, min(timeout, 0.5)) as sock:
        try:
            sock.send(b"socket-echo: is anyone there?")
            sock.recv(65535)
        except ConnectionRefusedError:
            raise Unreachable(f"{target.url}: {ICMP_REFUSED}") from None
        except (TimeoutError, OSError):
            pass


def is_loopback(target: Target) -> bool:
    """Whether the target is this machine (bench and probe read their figures by it)."""
    try:
        return ipaddress.ip_address(target.host.split("%", 1)[0]).is_loopback
    except ValueError:
        return target.host == "localhost"
