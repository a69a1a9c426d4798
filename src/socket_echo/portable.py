"""The Zephyr "Socket Echo Server" sample in Python: one file for CPython and MicroPython.

Like the C sample (samples/net/sockets/echo), the same source runs on a POSIX host and on a
board: here under CPython (``python -m socket_echo.portable``) and under MicroPython, whose
Zephyr port runs on real boards (``micropython portable.py``, or copied to a board as main.py).
It imports nothing beyond ``socket``, ``select``, ``sys`` and ``errno``, and parses its
arguments by hand because MicroPython has no argparse.

    portable.py [--port P] [--multi N]

Default: exactly the seed. One IPv6 socket on the any-address with IPV6_V6ONLY turned off, so
IPv4 clients arrive as IPv4-mapped addresses (plain IPv4 where the platform has no IPv6); port
4242; backlog 5; blocking sockets; one client at a time, the others wait in the backlog.
One fix over the seed: it receives up to 1 KiB at a time and turns on TCP_NODELAY, so a 1 KiB
round trip does not stall ~40 ms on Nagle and delayed ACKs as the seed's 128-byte sends do.

``--multi N`` serves up to N clients at once with poll(), like Zephyr's echo_async sample;
when full it answers "Too many connections" and closes the newcomer.
"""

import errno
import select
import socket
import sys

PORT = 4242
BACKLOG = 5
RECV_SIZE = 1024
TOO_MANY = b"Too many connections\n"

# Not every port has every constant: MicroPython's Unix port has no IPPROTO_IPV6, for one.
# Fall back to the numeric values, which Linux and Zephyr share.
IPPROTO_IPV6 = getattr(socket, "IPPROTO_IPV6", 41)
IPV6_V6ONLY = getattr(socket, "IPV6_V6ONLY", 26)
IPPROTO_TCP = getattr(socket, "IPPROTO_TCP", 6)
TCP_NODELAY = getattr(socket, "TCP_NODELAY", 1)
SOL_SOCKET = getattr(socket, "SOL_SOCKET", 1)
SO_REUSEADDR = getattr(socket, "SO_REUSEADDR", 2)


def log(message):
    print(message)
    if hasattr(sys.stdout, "flush"):
        sys.stdout.flush()  # CPython buffers a piped stdout; MicroPython does not


def error(call, exc):
    # The seed prints "error: <call>: <errno>".
    log("error: %s: %d" % (call, exc.args[0] if exc.args else -1))


def format_address(addr):
    """A peer address as HOST:PORT. CPython's accept() gives a (host, port, ...) tuple;
    MicroPython's Unix port gives the raw sockaddr bytes, which socket.sockaddr() splits."""
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
    """--port P and --multi N, by hand. Returns (port, multi) or exits 2 with a message."""
    port, multi = PORT, 0
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            log("usage: portable.py [--port P] [--multi N]")
            sys.exit(0)
        if arg not in ("--port", "--multi") or i + 1 >= len(argv):
            log("error: unknown or incomplete argument: %s" % arg)
            sys.exit(2)
        try:
            value = int(argv[i + 1])
        except ValueError:
            value = -1
        if arg == "--port" and 0 <= value <= 65535:
            port = value
        elif arg == "--multi" and value >= 1:
            multi = value
        else:
            log("error: bad value for %s: %s" % (arg, argv[i + 1]))
            sys.exit(2)
        i += 2
    return port, multi


def listen(port):
    """The seed's socket: IPv6 any-address with IPV6_V6ONLY off; IPv4 where there is no IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        host = "::"
        try:
            sock.setsockopt(IPPROTO_IPV6, IPV6_V6ONLY, 0)
        except OSError:
            pass  # IPv6 only, then; IPv4 clients cannot come in on this platform
    except (OSError, AttributeError):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        host = "0.0.0.0"
    sock.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    for info in socket.getaddrinfo(host, port):
        if info[0] == family:
            sock.bind(info[-1])
            break
    else:
        sock.bind(socket.getaddrinfo(host, port)[0][-1])
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


def serve_many(sock, port, limit):
    log(
        "Multi-client (poll) TCP echo server waits for connections on port %d, up to %d..."
        % (port, limit)
    )
    poller = select.poll()
    poller.register(sock, select.POLLIN)
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
    port, multi = parse_args(argv)
    try:
        sock = listen(port)
    except OSError as exc:
        error("bind", exc)
        sys.exit(1)
    port = real_port(sock, port)
    try:
        if multi:
            serve_many(sock, port, multi)
        else:
            serve_one_at_a_time(sock, port)
    except KeyboardInterrupt:
        sock.close()


if __name__ == "__main__":
    main(sys.argv)
