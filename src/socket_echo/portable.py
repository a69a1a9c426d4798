"""The Zephyr "Socket Echo Server" sample in Python: one file for CPython and MicroPython.

Like the C sample (samples/net/sockets/echo), the same source runs on a POSIX host and on a
board: here under CPython (``python -m socket_echo.portable``), MicroPython's Unix port
(``micropython portable.py``) and MicroPython's Zephyr port (copied to a board as main.py;
docs/zephyr.md says what works there and what does not). It imports only ``socket``, ``sys``
and ``errno`` (``select`` only for ``--multi``), and parses its arguments by hand because
MicroPython has no argparse.

    portable.py [--port P] [--multi N] [--ipv4 | --ipv6]

Default: exactly the seed. One IPv6 socket on the any-address with IPV6_V6ONLY turned off, so
IPv4 clients arrive as IPv4-mapped addresses (plain IPv4 where the platform has no IPv6); port
4242; backlog 5; blocking sockets; one client at a time, the others wait in the backlog.
One fix over the seed: it receives up to 1 KiB at a time and turns on TCP_NODELAY, so a 1 KiB
round trip does not stall ~40 ms on Nagle and delayed ACKs as the seed's 128-byte sends do.

On MicroPython's Zephyr port (ports/zephyr/modsocket.c, the same from v1.20 on) the socket
surface is smaller, and the code asks for no more than it has: ``setsockopt`` does nothing
there (so IPv6 sockets stay IPv6-only, and TCP_NODELAY never reaches Zephyr), ``bind`` takes
only ``(host, port)``, ``accept`` gives no peer address, ``getaddrinfo`` without a family asks
for an A record first, and the port has no ``select`` module. So there it listens on the IPv4
any-address (``--ipv6``: the IPv6 one instead), binds ``(host, port)``, and never calls
``sys.exit`` (on a board that soft-reboots into main.py again: an error would loop for ever).

``--multi N`` serves up to N clients at once with poll(), like Zephyr's echo_async sample;
when full it answers "Too many connections" and closes the newcomer. Where the port has no
``select.poll`` or its sockets cannot be polled (the Zephyr port), it says so and exits 2.
"""

import errno
import socket
import sys

PORT = 4242
BACKLOG = 5
RECV_SIZE = 1024
TOO_MANY = b"Too many connections\n"
USAGE = "usage: portable.py [--port P] [--multi N] [--ipv4 | --ipv6]"

# Not every port has every constant: MicroPython's Unix port has no IPPROTO_IPV6, for one.
# Fall back to the numeric values, which Linux and Zephyr share.
IPPROTO_IPV6 = getattr(socket, "IPPROTO_IPV6", 41)
IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)
IPPROTO_TCP = getattr(socket, "IPPROTO_TCP", 6)
TCP_NODELAY = getattr(socket, "TCP_NODELAY", 1)
SOL_SOCKET = getattr(socket, "SOL_SOCKET", 1)
SO_REUSEADDR = getattr(socket, "SO_REUSEADDR", 2)

# MicroPython's Zephyr port: its socket module has pkt_get_info(), no other port's does.
ZEPHYR = sys.platform == "zephyr" or hasattr(socket, "pkt_get_info")
# Its setsockopt() is a no-op (with a warning) until the 2026 rewrite of modsocket.c, which
# added real options (and the SO_TCP table of their names).
SETSOCKOPT_WORKS = not ZEPHYR or hasattr(socket, "SO_TCP")
# On a board, SystemExit from main.py soft-reboots into main.py again: return to the REPL.
HOSTS = ("linux", "darwin", "win32", "windows", "cygwin", "freebsd", "openbsd", "netbsd")
ON_BOARD = ZEPHYR or sys.platform not in HOSTS


class Usage(Exception):
    """A user's mistake on the command line: the message, then exit 2 (or the REPL)."""


def log(message):
    print(message)
    if hasattr(sys.stdout, "flush"):
        sys.stdout.flush()  # CPython buffers a piped stdout; MicroPython does not


def error(call, exc):
    # The seed prints "error: <call>: <errno>".
    log("error: %s: %d" % (call, exc.args[0] if exc.args else -1))


def format_address(addr):
    """A peer address as HOST:PORT. CPython's accept() gives a (host, port, ...) tuple;
    MicroPython's Unix port gives the raw sockaddr bytes, which socket.sockaddr() splits; the
    Zephyr port gives None (its accept() does not report the peer)."""
    if addr is None:
        return "a peer whose address this port does not report"
    if not isinstance(addr, tuple) and hasattr(socket, "sockaddr"):
        family, raw, port = socket.sockaddr(addr)[:3]
        addr = (socket.inet_ntop(family, raw), port)
    if not isinstance(addr, tuple):
        return str(addr)
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # an IPv4 client on the dual-stack socket
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def parse_args(argv):
    """--port P, --multi N, --ipv4/--ipv6, by hand. Returns (port, multi, family) with family
    None (the platform's default), "ipv4" or "ipv6"; raises Usage."""
    port, multi, family = PORT, 0, None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return None
        if arg in ("--ipv4", "--ipv6"):
            family = arg[2:]
            i += 1
            continue
        if arg not in ("--port", "--multi") or i + 1 >= len(argv):
            raise Usage("unknown or incomplete argument: %s" % arg)
        try:
            value = int(argv[i + 1])
        except ValueError:
            value = -1
        if arg == "--port" and 0 <= value <= 65535:
            port = value
        elif arg == "--multi" and value >= 1:
            multi = value
        else:
            raise Usage("bad value for %s: %s" % (arg, argv[i + 1]))
        i += 2
    return port, multi, family


def resolve(host, port, family):
    """The address to bind, resolved with an explicit family (the Zephyr port's getaddrinfo
    asks for an A record first when given none, and raises on an IPv6 literal). Returned as
    the port's bind() wants it: ``(host, port)`` where getaddrinfo gives tuples (CPython
    accepts it for IPv6 too; the Zephyr port accepts nothing longer), raw sockaddr bytes on
    MicroPython's Unix port."""
    for info in socket.getaddrinfo(host, port, family):
        if info[0] == family:
            addr = info[-1]
            return addr[:2] if isinstance(addr, tuple) else addr
    return (host, port)


def listen(port, family=None):
    """The seed's socket: IPv6 any-address with IPV6_V6ONLY off; IPv4 where there is no IPv6.
    Where IPV6_V6ONLY cannot be turned off (the Zephyr port), the IPv4 any-address unless
    ``family`` asks for IPv6 (then IPv6 clients only)."""
    want_v6 = family == "ipv6" or (family is None and SETSOCKOPT_WORKS)
    sock = None
    if want_v6:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except (OSError, AttributeError):
            if family == "ipv6":
                raise
    if sock is not None:
        host, af = "::", socket.AF_INET6
        if SETSOCKOPT_WORKS:
            try:
                sock.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 1 if family == "ipv6" else 0)
            except OSError:
                pass  # IPv6 only, then; IPv4 clients cannot come in on this platform
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        host, af = "0.0.0.0", socket.AF_INET
    if SETSOCKOPT_WORKS:
        sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    sock.bind(resolve(host, port, af))
    sock.listen(BACKLOG)
    return sock


def real_port(sock, port):
    """The port bound (useful with --port 0). MicroPython has no getsockname(): there the
    port asked for is what we report."""
    try:
        return sock.getsockname()[1]
    except (AttributeError, OSError, TypeError):
        return port


def set_nodelay(client):
    if not SETSOCKOPT_WORKS:
        return  # the Zephyr port: a no-op that warns on every call (docs/zephyr.md)
    try:
        client.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
    except OSError:
        pass  # not every stack has it; the echo still works, only slower for small sends


def send_all(client, data):
    """Send every byte, finishing partial sends as the seed does."""
    while data:
        sent = client.send(data)
        data = data[sent:]


def echo_one(client):
    """Echo until the client closes (recv returns nothing). Blocking."""
    while True:
        data = client.recv(RECV_SIZE)
        if not data:
            return
        send_all(client, data)


def serve_one_at_a_time(sock, port):
    log("Single-threaded TCP echo server waits for a connection on port %d..." % port)
    counter = 0
    while True:
        try:
            client, addr = sock.accept()
        except OSError as exc:
            error("accept", exc)
            continue
        counter += 1
        peer = format_address(addr)
        log("Connection #%d from %s" % (counter, peer))
        set_nodelay(client)
        try:
            echo_one(client)
        except OSError as exc:
            error("recv/send", exc)
        client.close()
        log("Connection from %s closed" % peer)


def key_of(obj):
    """CPython's poll() reports descriptors, MicroPython's the socket objects."""
    if isinstance(obj, int):
        return obj
    if hasattr(obj, "fileno"):
        return obj.fileno()
    return id(obj)


def poller_for(sock):
    """A poll object watching ``sock``, or Usage when this port cannot poll sockets: no
    ``select`` module (the Zephyr port builds at the BASIC feature level), or sockets without
    the poll ioctl (the Zephyr port's, even with ``select`` built in)."""
    try:
        import select
    except ImportError:
        raise Usage("--multi needs select.poll, which this MicroPython port lacks") from None
    if not hasattr(select, "poll"):
        raise Usage("--multi needs select.poll, which this port lacks")
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        poller.poll(0)
    except (OSError, TypeError, ValueError):
        raise Usage("--multi: this port's sockets cannot be polled") from None
    return select, poller


def serve_many(sock, port, limit, select, poller):
    log(
        "Multi-client (poll) TCP echo server waits for connections on port %d, up to %d..."
        % (port, limit)
    )
    listen_key = key_of(sock)
    clients = {}  # key -> (socket, peer)
    counter = 0
    while True:
        for obj, _event in poller.poll():
            key = key_of(obj)
            if key == listen_key:
                try:
                    client, addr = sock.accept()
                except OSError as exc:
                    error("accept", exc)
                    continue
                peer = format_address(addr)
                if len(clients) >= limit:
                    try:
                        send_all(client, TOO_MANY)
                    except OSError:
                        pass
                    client.close()
                    log("Connection from %s refused: too many connections" % peer)
                    continue
                counter += 1
                set_nodelay(client)
                clients[key_of(client)] = (client, peer)
                poller.register(client, select.POLLIN)
                log("Connection #%d from %s" % (counter, peer))
                continue
            if key not in clients:
                continue
            client, peer = clients[key]
            try:
                data = client.recv(RECV_SIZE)
                if data:
                    send_all(client, data)
                    continue
            except OSError as exc:
                if exc.args and exc.args[0] != errno.ECONNRESET:
                    error("recv/send", exc)
            poller.unregister(client)
            del clients[key]
            client.close()
            log("Connection from %s closed" % peer)


def main(argv):
    """Serve until interrupted; returns the exit code (0, 1 an error, 2 a usage mistake)."""
    try:
        parsed = parse_args(argv)
    except Usage as exc:
        log("error: %s" % exc)
        return 2
    if parsed is None:
        log(USAGE)
        return 0
    port, multi, family = parsed
    try:
        sock = listen(port, family)
    except OSError as exc:
        error("bind", exc)
        return 1
    port = real_port(sock, port)
    try:
        if multi:
            try:
                select, poller = poller_for(sock)
            except Usage as exc:
                sock.close()
                log("error: %s" % exc)
                return 2
            serve_many(sock, port, multi, select, poller)
        else:
            serve_one_at_a_time(sock, port)
    except KeyboardInterrupt:
        sock.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    if code and not ON_BOARD:
        sys.exit(code)  # on a board: back to the REPL, never a reboot into main.py again
