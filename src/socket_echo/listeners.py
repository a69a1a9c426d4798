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
import socket

from socket_echo.config import DEFAULT_HOSTS, ConfigError, ListenerSpec, format_url


class BindError(OSError):
    """A listener could not be set up at run time (port in use, permission); one-line message."""


@dataclasses.dataclass
class BoundListener:
    spec: ListenerSpec  # with the real port
    sock: socket.socket
    dual_stack: bool = False

    @property
    def url(self) -> str:
        return self.spec.url


_HINTS = {
    errno.EADDRINUSE: "address already in use (is another server on this port?)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "address not available on this machine",
}


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


def _bind_one(
    family: socket.AddressFamily, address: str, port: int, backlog: int, dual_stack: bool
) -> socket.socket:
    # proto=IPPROTO_TCP, not 0: accepted sockets inherit it, and the stdlib loop turns
    # TCP_NODELAY on only for sockets whose proto says TCP (base_events._set_nodelay).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # The seed's "sharing same socket between IPv6 and IPv4": V6ONLY off on '::' only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_spec(spec: ListenerSpec, port: int, backlog: int, optional: bool) -> list[BoundListener]:
    bound: list[BoundListener] = []
    try:
        for family, address in _addresses(spec.host, port):
            real_port = bound[0].spec.port if bound else port
            if family == socket.AF_INET6 and address == "::":
                try:
                    sock = _bind_one(family, address, real_port, backlog, dual_stack=True)
                    dual = True
                except OSError as exc:
                    if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    # The OS refuses a dual-stack socket: two sockets, as echo_async does.
                    sock = _bind_one(family, address, real_port, backlog, dual_stack=False)
                    dual = False
                    v4 = _bind_one(socket.AF_INET, "0.0.0.0", real_port, backlog, False)
                    bound.append(_listener(spec, v4))
                bound.append(_listener(spec, sock, dual))
            else:
                bound.append(_listener(spec, _bind_one(family, address, real_port, backlog, False)))
    except OSError as exc:
        for b in bound:
            b.sock.close()
        if optional and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return []
        hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
        raise BindError(
            exc.errno, f"cannot listen on {format_url(spec.scheme, spec.host, port)}: {hint}"
        ) from None
    return bound


def _listener(spec: ListenerSpec, sock: socket.socket, dual: bool = False) -> BoundListener:
    host, port = sock.getsockname()[:2]
    return BoundListener(ListenerSpec(spec.scheme, host, port), sock, dual)


def bind_all(specs: tuple[ListenerSpec, ...], backlog: int) -> list[BoundListener]:
    """Bind every spec. Specs that ask for port 0 share the first free port found, so that
    the default pair 127.0.0.1 + ::1 answers on one port; ``::1`` where the machine has no
    IPv6 is skipped when it came from the defaults."""
    shared_port: int | None = None
    for attempt in range(20):
        bound: list[BoundListener] = []
        try:
            for spec in specs:
                port = spec.port
                if port == 0 and shared_port is not None:
                    port = shared_port
                optional = spec.host in DEFAULT_HOSTS and spec.host == "::1"
                got = _bind_spec(spec, port, backlog, optional)
                if spec.port == 0 and shared_port is None and got:
                    shared_port = got[0].spec.port
                bound.extend(got)
        except BindError as exc:
            for b in bound:
                b.sock.close()
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
        with contextlib.suppress(OSError):
            b.sock.close()
