"""Deliberately broken echo servers for testing probe, bench and client.

    python broken_servers.py MODE     (binds 127.0.0.1 on a free port, prints "PORT n")

tcp modes: good, drop (loses one byte in every 3000), reorder (swaps two bytes in every 7th
read), mute (reads, never answers), seed (one client at a time, 128-byte recv/send, Nagle on:
the Zephyr sample's design), once (echoes one read, then resets the connection), deaf (never
reads, with a 4 KiB receive buffer: a client's send stays partial). udp modes: udp (good),
udp-lossy (ignores every 2nd datagram), udp-mute.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import sys
import threading
import time


def serve_tcp(handler, one_at_a_time: bool = False, nodelay: bool = True, rcvbuf: int = 0) -> None:  # type: ignore[no-untyped-def]
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:  # accepted sockets inherit it
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    ls.bind(("127.0.0.1", 0))
    ls.listen(64 if not one_at_a_time else 5)
    print("PORT", ls.getsockname()[1], flush=True)
    while True:
        conn, _ = ls.accept()
        if nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if one_at_a_time:
            try:
                handler(conn)
            except OSError as exc:  # like the seed: print the error, serve the next client
                print(f"error: {exc.errno}", flush=True)
        else:
            threading.Thread(target=handler, args=(conn,), daemon=True).start()


def dropping(conn: socket.socket) -> None:
    total = 0
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(65536):
            out = bytearray()
            for i, b in enumerate(data):
                if (total + i) % 3000 != 2999:
                    out.append(b)
            total += len(data)
            conn.sendall(out)


def reordering(conn: socket.socket) -> None:
    reads = 0
    with conn:
        while data := conn.recv(65536):
            reads += 1
            if reads % 7 == 0 and len(data) >= 2 and data[0] != data[1]:
                data = data[1:2] + data[0:1] + data[2:]
            elif reads % 7 == 0 and len(data) == 1:
                data = bytes([data[0] ^ 0x01])  # one byte cannot be swapped: flip a bit
            conn.sendall(data)


def mute(conn: socket.socket) -> None:
    with conn:
        while conn.recv(65536):
            pass


def once(conn: socket.socket) -> None:
    """Echo one read, then RST: the client's next send (or read) fails."""
    with conn, contextlib.suppress(OSError):
        conn.sendall(conn.recv(65536))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def deaf(conn: socket.socket) -> None:
    """Never reads: once its small receive buffer is full, a client's sends stall."""
    threading.Event().wait()


def trickle(conn: socket.socket) -> None:
    """Echoes everything, one byte every 0.2 s: never silent for long, never done."""
    owed = bytearray()
    eof = False
    tick = time.monotonic()
    with conn, contextlib.suppress(OSError):
        while not eof or owed:
            tick += 0.2  # the pace: a byte a tick, whatever arrives meanwhile
            while (left := tick - time.monotonic()) > 0:
                readable = select.select([] if eof else [conn], [], [], left)[0]
                if readable:
                    data = conn.recv(65536)
                    eof = not data
                    owed += data
            if owed:
                conn.sendall(owed[:1])
                del owed[:1]


def witness(conn: socket.socket) -> None:
    """The seed's loop (128-byte reads, one client at a time) that says how each connection
    ended: "END fin" when the peer half-closed (recv() == 0), "END reset" on a reset, which
    would have wedged the seed on a board (it takes recv() == -1 for data)."""
    with conn:
        try:
            while data := conn.recv(128):
                while data:
                    data = data[conn.send(data) :]
            print("END fin", flush=True)
        except ConnectionResetError:
            print("END reset", flush=True)


def seed_like(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(128):
            while data:
                data = data[conn.send(data) :]


def serve_udp(mode: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print("PORT", sock.getsockname()[1], flush=True)
    n = 0
    while True:
        data, peer = sock.recvfrom(65535)
        n += 1
        if mode == "udp-mute" or (mode == "udp-lossy" and n % 2 == 0):
            continue
        if mode == "udp-small" and len(data) > 1472:  # one Ethernet frame, as a stack that
            continue  # does not reassemble IPv4 fragments answers
        sock.sendto(data, peer)


def good(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode.startswith("udp"):
        serve_udp(mode)
    elif mode == "seed":
        serve_tcp(seed_like, one_at_a_time=True, nodelay=False)
    elif mode == "witness":
        serve_tcp(witness, one_at_a_time=True, nodelay=False)
    elif mode == "deaf":
        serve_tcp(deaf, rcvbuf=4096)
    else:
        handlers = {"good": good, "drop": dropping, "reorder": reordering, "mute": mute,
                    "trickle": trickle}  # fmt: skip
        serve_tcp({**handlers, "once": once}[mode])
