"""MicroPython's Zephyr-port ``socket`` module, emulated on MicroPython's Unix port.

It stands in for the platform (a Zephyr board's socket module), not for the code under test:
tests/test_portable.py runs the real portable.py, unchanged, under the real MicroPython
interpreter with this file first on its path, so that portable.py meets exactly the surface a
board gives it. ``usocket`` still reaches the Unix port's built-in module, which does the I/O.

What it follows: ports/zephyr/modsocket.c of micropython/micropython at commit 529dfd92 (the
file is the same from v1.20 until its 2026 rewrite), with Zephyr's dns_resolve_name() for
getaddrinfo's literals (subsys/net/lib/dns/resolve.c). Its module table, and nothing else:
socket, AF_INET, AF_INET6, SOCK_STREAM, SOCK_DGRAM, SOL_SOCKET (1), SO_REUSEADDR (2),
getaddrinfo, pkt_get_info. A socket's methods: close, bind, connect, listen, accept, send,
recv, recvfrom, setsockopt, read, readinto, readline, write, makefile. Behaviour:

- bind and connect take exactly ``(host, port)`` (mp_obj_get_array_fixed_n(addr, 2)): an
  IPv6 4-tuple raises ValueError; the host is parsed for the socket's own family;
- accept returns ``(socket, None)``: the peer address is never filled in ("TODO");
- setsockopt does nothing but warn "setsockopt() not implemented" (so IPv6 sockets keep
  Zephyr's default, IPv6 only, and TCP_NODELAY never reaches the stack);
- getaddrinfo(host, port[, family]) asks for an A record unless family is AF_INET6 and, with
  no family, then for an AAAA record; a query whose literal is of the other family fails at
  once (-EPFNOSUPPORT, raised before the second query); results are
  ``(family, SOCK_STREAM, 6, '', addr)`` with ``(host, port)`` for IPv4 and
  ``(host, port, 0, 0)`` for IPv6. No DNS server here: names other than literals fail;
- no fileno, getsockname, getpeername, setblocking or settimeout, and no poll ioctl (the
  port builds at the BASIC feature level, where there is no select module: see select.py).
"""

import sys

import usocket as _host

AF_INET = _host.AF_INET
AF_INET6 = _host.AF_INET6
SOCK_STREAM = _host.SOCK_STREAM
SOCK_DGRAM = _host.SOCK_DGRAM
SOL_SOCKET = 1
SO_REUSEADDR = 2

_EPFNOSUPPORT = 96
_EBADF = 9


def _sockaddr(family, host, port):
    """The Linux sockaddr bytes the Unix port's bind/connect take (little-endian family)."""
    try:
        raw = _host.inet_pton(family, host)
    except (OSError, ValueError):
        raise ValueError("failed to parse socket address") from None
    head = bytes([family & 0xFF, family >> 8, (port >> 8) & 0xFF, port & 0xFF])
    if family == AF_INET:
        return head + raw + bytes(8)
    return head + bytes(4) + raw + bytes(4)


class socket:
    def __init__(self, family=AF_INET, type=SOCK_STREAM, proto=-1):
        self._family = family
        self._s = _host.socket(family, type)
        if family == AF_INET6:
            self._s.setsockopt(41, 26, 1)  # IPPROTO_IPV6, IPV6_V6ONLY: Zephyr's default

    def _addr(self, addr):
        if len(addr) != 2:
            raise ValueError("requested length 2 but object has length %d" % len(addr))
        return _sockaddr(self._family, addr[0], int(addr[1]))

    def _open(self):
        if self._s is None:
            raise OSError(_EBADF)
        return self._s

    def bind(self, addr):
        self._open().bind(self._addr(addr))

    def connect(self, addr):
        self._open().connect(self._addr(addr))

    def listen(self, backlog=2):
        self._open().listen(backlog)

    def accept(self):
        client, _ = self._open().accept()
        return _Accepted(client, self._family), None

    def send(self, data):
        return self._open().send(data)

    def recv(self, n):
        return self._open().recv(n)

    def recvfrom(self, n):
        return self._open().recvfrom(n)

    def setsockopt(self, level, option, value):
        print("Warning: setsockopt() not implemented", file=sys.stderr)

    def read(self, *n):
        return self._open().read(*n)

    def readinto(self, *args):
        return self._open().readinto(*args)

    def readline(self, *args):
        return self._open().readline(*args)

    def write(self, data):
        return self._open().write(data)

    def makefile(self, *args):
        return self

    def close(self):
        if self._s is not None:
            self._s.close()
            self._s = None


class _Accepted(socket):
    def __init__(self, host_socket, family):
        self._family = family
        self._s = host_socket


def getaddrinfo(host, port, family=0):
    port = int(port)
    result = []
    queries = (AF_INET, AF_INET6) if family == 0 else (AF_INET6 if family == AF_INET6 else AF_INET,)
    for query in queries:
        literal = None
        for af in (AF_INET, AF_INET6):
            try:
                _host.inet_pton(af, host)
                literal = af
            except (OSError, ValueError):
                pass
        if literal is None:
            raise OSError(-2)  # no DNS server on this emulated board: DNS_EAI_NONAME
        if literal != query:
            raise OSError(_EPFNOSUPPORT)  # RAISE_ERRNO: before any further query
        addr = (host, port) if query == AF_INET else (host, port, 0, 0)
        result.append((query, SOCK_STREAM, 6, "", addr))
    return result


def pkt_get_info():
    return (8, 8, 16, 16)  # free rx/tx packets and buffers (as a board would report)
