"""Listener specs -> bound, listening sockets.

Creating the sockets ourselves (rather than letting the loop do it) gives one place for the
seed's dual-stack trick, for a shared real port when ``--port 0`` binds several addresses, and
for error messages a user can act on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import socket
import stat
import sys

from socket_echo import groups
from socket_echo.config import DEFAULT_HOSTS, ConfigError, ListenerSpec, format_url
from socket_echo.kinds import kind


class BindError(OSError):
    """A listener could not be set up at run time (port in use, permission); one-line message."""


@dataclasses.dataclass
class BoundListener:
    spec: ListenerSpec  # with the real port
    sock: socket.socket
    dual_stack: bool = False
    inode: int = 0  # unix: the socket file we created, removed on close if still ours

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def scheme(self) -> str:
        return self.spec.scheme

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if kind(self.spec.scheme).unix and self.inode:
            with contextlib.suppress(OSError):
                if os.stat(self.spec.path).st_ino == self.inode:
                    os.unlink(self.spec.path)
            self.inode = 0


_HINTS = {
    errno.EADDRINUSE: "address already in use (is another server on this port?)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "address not available on this machine",
}


def socket_type(scheme: str) -> tuple[socket.SocketKind, int]:
    """(type, proto) of a host-and-port listener's sockets."""
    if kind(scheme).datagram:
        return socket.SOCK_DGRAM, socket.IPPROTO_UDP
    return socket.SOCK_STREAM, socket.IPPROTO_TCP


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, str]]:
    """The (family, address) pairs a host stands for; literals map to themselves."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, host)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"unknown host {host!r}: {exc.strerror}") from None
    seen: list[tuple[socket.AddressFamily, str]] = []
    for family, _, _, _, sockaddr in infos:
        pair = (family, str(sockaddr[0]))
        if family in (socket.AF_INET, socket.AF_INET6) and pair not in seen:
            seen.append(pair)
    return seen


# Several processes binding one address, the kernel spreading connections and datagrams over
# them: Linux's SO_REUSEPORT. macOS and the BSDs have the option but do not balance with it
# (the newest socket gets everything), so there the workers share one inherited socket.
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


@dataclasses.dataclass(frozen=True)
class BindOptions:
    """How sockets are made: ``reuse_port`` lets several processes (``--workers``) bind the
    same address; ``listen=False`` binds a stream socket without listening, so the kernel's
    SO_REUSEPORT group (listening sockets only) never hands it a connection."""

    backlog: int
    reuse_port: bool = False
    listen: bool = True


def _bind_one(
    family: socket.AddressFamily,
    address: str,
    port: int,
    backlog: int | BindOptions,
    dual_stack: bool,
    scheme: str = "tcp",
) -> socket.socket:
    opts = backlog if isinstance(backlog, BindOptions) else BindOptions(backlog)
    # proto=IPPROTO_TCP, not 0: accepted sockets inherit it, and the stdlib loop turns
    # TCP_NODELAY on only for sockets whose proto says TCP (base_events._set_nodelay).
    sock_type, proto = socket_type(scheme)
    sock = socket.socket(family, sock_type, proto)
    try:
        if sock_type == socket.SOCK_STREAM:
            # Not for UDP: there SO_REUSEADDR lets a second server bind the same port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if opts.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # The seed's "sharing same socket between IPv6 and IPv4": V6ONLY off on '::' only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((address, port))
        if sock_type == socket.SOCK_STREAM and opts.listen:
            sock.listen(opts.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(spec: ListenerSpec, backlog: int) -> BoundListener:
    """A stale socket file (nobody listening) is replaced; a live one is an error."""
    path = spec.path
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BindError(
                errno.EEXIST, f"cannot listen on {spec.url}: the path exists and is not a socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: left by a server that is gone
        except OSError as exc:
            raise BindError(exc.errno, f"cannot listen on {spec.url}: {exc.strerror}") from None
        else:
            raise BindError(
                errno.EADDRINUSE,
                f"cannot listen on {spec.url}: another server is listening on this socket",
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # a folder said no, not a port
            hint = f"permission denied: cannot create a socket in {os.path.dirname(path)}"
        else:
            hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        raise BindError(exc.errno, f"cannot listen on {spec.url}: {hint}") from None
    return BoundListener(spec, sock, inode=os.stat(path).st_ino)


def _bind_group(spec: ListenerSpec, port: int) -> BoundListener:
    """A UDP socket bound to a multicast group's address and port, the group joined on its
    interface (groups.py). SO_REUSEADDR: more than one member of a group on one host is the
    normal case. Never SO_REUSEPORT: workers share this one socket (a group's datagram reaches
    every socket bound to it, so each worker would answer it)."""
    assert spec.group is not None
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    where = format_url(spec.scheme, spec.host, port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((spec.host, port, 0, groups.ifindex(spec.group.iface)))
        else:
            sock.bind((spec.host, port))
        groups.join(sock, spec.host, spec.group)
        sock.setblocking(False)
    except groups.GroupError as exc:
        sock.close()
        raise BindError(errno.ENODEV, f"cannot join {where}: {exc}") from None
    except OSError as exc:
        sock.close()
        hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        on = f" on {spec.group.iface}" if spec.group.iface else ""
        raise BindError(exc.errno, f"cannot join {where}{on}: {hint}") from None
    return _listener(spec, sock)


def _bind_spec(
    spec: ListenerSpec, port: int, backlog: BindOptions, optional: bool
) -> list[BoundListener]:
    if kind(spec.scheme).unix:
        return [_bind_unix(spec, backlog.backlog)]
    if spec.group is not None:
        return [_bind_group(spec, port)]
    bound: list[BoundListener] = []
    try:
        for family, address in _addresses(spec.host, port):
            real_port = bound[0].spec.port if bound else port
            if family == socket.AF_INET6 and address == "::":
                try:
                    sock = _bind_one(family, address, real_port, backlog, True, spec.scheme)
                    dual = True
                except OSError as exc:
                    if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    # The OS refuses a dual-stack socket: two sockets, as echo_async does.
                    sock = _bind_one(family, address, real_port, backlog, False, spec.scheme)
                    dual = False
                    v4 = _bind_one(
                        socket.AF_INET, "0.0.0.0", real_port, backlog, False, spec.scheme
                    )
                    bound.append(_listener(spec, v4))
                bound.append(_listener(spec, sock, dual))
            else:
                bound.append(
                    _listener(
                        spec, _bind_one(family, address, real_port, backlog, False, spec.scheme)
                    )
                )
    except OSError as exc:
        for b in bound:
            b.close()
        if optional and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return []
        hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        raise BindError(
            exc.errno, f"cannot listen on {format_url(spec.scheme, spec.host, port)}: {hint}"
        ) from None
    return bound


def _listener(spec: ListenerSpec, sock: socket.socket, dual: bool = False) -> BoundListener:
    host, port = sock.getsockname()[:2]
    return BoundListener(dataclasses.replace(spec, host=host, port=port), sock, dual)


def bind_all(specs: tuple[ListenerSpec, ...], backlog: int | BindOptions) -> list[BoundListener]:
    """Bind every spec. Specs that ask for port 0 share the first free port found, so that
    the default pair 127.0.0.1 + ::1 answers on one port; ``::1`` where the machine has no
    IPv6 is skipped when it came from the defaults."""
    if not isinstance(backlog, BindOptions):
        backlog = BindOptions(backlog)
    shared_port: int | None = None
    for attempt in range(20):
        bound: list[BoundListener] = []
        on_shared: set[tuple[int, str]] = set()  # (socket type, host) already on shared_port
        try:
            for spec in specs:
                port = spec.port
                sock_type = 0 if kind(spec.scheme).unix else socket_type(spec.scheme)[0]
                if (
                    port == 0
                    and shared_port is not None
                    and (sock_type, spec.host) not in on_shared
                ):
                    port = shared_port
                if port == shared_port or (spec.port == 0 and shared_port is None):
                    on_shared.add((sock_type, spec.host))
                optional = spec.host in DEFAULT_HOSTS and spec.host == "::1"
                got = _bind_spec(spec, port, backlog, optional)
                if spec.port == 0 and shared_port is None and got:
                    shared_port = got[0].spec.port
                bound.extend(got)
        except BindError as exc:
            for b in bound:
                b.close()
            # A port picked by the kernel for the first address may be taken on another.
            if exc.errno == errno.EADDRINUSE and shared_port is not None and attempt < 19:
                shared_port = None
                continue
            raise
        if not bound:
            raise BindError(errno.EADDRNOTAVAIL, "no address to listen on")
        return bound
    raise AssertionError("unreachable")


def close_all(listeners: list[BoundListener]) -> None:
    for b in listeners:
        b.close()


def rebind(bound: BoundListener, backlog: int) -> BoundListener:
    """A worker's own socket on a listener's address (SO_REUSEPORT): same family, scheme,
    port and dual-stack setting; listening."""
    family = socket.AddressFamily(bound.sock.family)  # known even once the socket is closed
    opts = BindOptions(backlog, reuse_port=True)
    try:
        sock = _bind_one(
            family, bound.spec.host, bound.spec.port, opts, bound.dual_stack, bound.scheme
        )
    except OSError as exc:
        hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        raise BindError(exc.errno, f"cannot listen on {bound.url}: {hint}") from None
    return BoundListener(bound.spec, sock, bound.dual_stack)


def adopt_fd(fd: int) -> BoundListener:
    """An inherited socket (``--fd N``: systemd socket activation, other supervisors).
    Stream sockets must already listen; the scheme follows the socket: tcp, udp or unix."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(exc.errno, f"--fd {fd}: not an open socket ({exc.strerror})") from None
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or sock.type not in (
        socket.SOCK_STREAM,
        socket.SOCK_DGRAM,
    ):
        sock.detach()
        raise BindError(errno.EINVAL, f"--fd {fd}: not a TCP, UDP or Unix stream socket")
    if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise BindError(errno.EINVAL, f"--fd {fd}: the socket is not listening")
    if sock.family == socket.AF_UNIX:
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise BindError(errno.EINVAL, f"--fd {fd}: Unix datagram sockets are not served")
        spec = ListenerSpec("unix", "", 0, str(sock.getsockname()))
    else:
        host, port = sock.getsockname()[:2]
        spec = ListenerSpec("udp" if sock.type == socket.SOCK_DGRAM else "tcp", host, port)
    dual = sock.family == socket.AF_INET6 and not sock.getsockopt(
        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
    )
    sock.setblocking(False)
    return BoundListener(spec, sock, dual)  # inode 0: never unlink a file we did not make
