"""``socket-echo client``: telnet-like on a terminal, a binary-safe pipe otherwise.

From a pipe, stdin goes out and the echo goes to stdout; when stdin ends the client half-closes
and exits 0 once every byte came back as sent, 1 if the server stopped short or sent back
other bytes:

    head -c 10M /dev/urandom > f; socket-echo client HOST < f | cmp - f
"""

from __future__ import annotations

import os
import socket
import sys

from socket_echo.exits import FAILED, UNREACHABLE, ToolError
from socket_echo.tools.connect.duplex import DuplexError, duplex
from socket_echo.tools.connect.ending import end_gracefully
from socket_echo.tools.connect.target import (
    Target,
    TlsOptions,
    Unreachable,
    connect,
    group_socket,
)
from socket_echo.tools.defaults import DEFAULT_DRAIN_TIMEOUT

CHUNK = 64 * 1024
UDP_CHUNK = 1024  # bytes per datagram from a pipe: fits every path's MTU
UDP_TRIES = 3


class ClientError(Exception):
    """One line for the user; exit 1."""


def main(target: Target, tls: TlsOptions | None, timeout: float, alpn: str) -> int:
    """``socket-echo client`` on any target: the exit code (exits.py), or ToolError."""
    try:
        if target.scheme == "quic":
            from socket_echo.tools.client import quic

            return quic.run(target, tls, timeout, alpn)
        if target.scheme == "dtls":
            from socket_echo.tools.client import dtls
            from socket_echo.tools.connect.dtls import DtlsFailed

            try:
                return dtls.run(target, tls, timeout)
            except DtlsFailed as exc:
                raise ToolError(f"{target.url}: {exc}", FAILED) from None
        return run(target, tls, timeout)
    except Unreachable as exc:
        raise ToolError(f"unreachable: {exc}", UNREACHABLE) from None
    except ClientError as exc:
        raise ToolError(str(exc), FAILED) from None
    except OSError as exc:
        raise ToolError(f"{target.url}: {exc.strerror or exc}", FAILED) from None


def run(target: Target, tls: TlsOptions | None, timeout: float) -> int:
    if target.group is not None:
        return group_udp(target, timeout)
    sock = connect(target, timeout, tls)
    try:
        if target.scheme == "udp":
            return udp(sock, timeout, target)
        if sys.stdin.isatty():
            return interactive(sock, timeout)
        return pipe(sock, timeout)
    finally:  # FIN and what is owed read, never a reset a firmware loop would choke on
        end_gracefully([sock], min(timeout, DEFAULT_DRAIN_TIMEOUT))


def pipe(sock: socket.socket, timeout: float) -> int:
    out = sys.stdout.buffer
    try:
        duplex(sock, sys.stdin.fileno(), out.write, timeout, verify=True)
    except DuplexError as exc:
        raise ClientError(str(exc)) from None
    finally:
        out.flush()
    return 0


def interactive(sock: socket.socket, timeout: float) -> int:
    """Telnet-like: each line typed goes out, what comes back is printed; Ctrl-D half-closes
    and waits for the rest of the echo. One thread (TLS sockets allow no other way)."""
    print("Connected. Lines you type are sent; Ctrl-D ends, Ctrl-C quits.", file=sys.stderr)

    def show(data: bytes) -> None:
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()

    try:
        duplex(sock, sys.stdin.fileno(), show, timeout, verify=True)
    except DuplexError as exc:
        raise ClientError(str(exc)) from None
    except KeyboardInterrupt:
        pass
    return 0


def udp(sock: socket.socket, timeout: float, target: Target) -> int:
    tty = sys.stdin.isatty()
    fd = sys.stdin.fileno()
    out = sys.stdout.buffer
    sock.settimeout(timeout / UDP_TRIES)
    while True:
        chunk = sys.stdin.readline().encode() if tty else os.read(fd, UDP_CHUNK)
        if not chunk:
            return 0
        for _ in range(UDP_TRIES):
            sock.send(chunk)
            try:
                reply = sock.recv(65535)
                break
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                raise Unreachable(
                    "refused: ICMP port unreachable (nothing listens there)"
                ) from None
        else:
            raise ClientError(f"no reply to a {len(chunk)}-byte datagram after {UDP_TRIES} tries")
        out.write(reply)
        out.flush()


def group_udp(target: Target, timeout: float) -> int:
    """A multicast group: each datagram goes to the group; the first member to answer is the
    one whose echo is written (named on stderr), the others' answers are counted apart (probe
    and bench measure every member)."""
    sock, group = group_socket(target, timeout / UDP_TRIES)
    tty = sys.stdin.isatty()
    fd = sys.stdin.fileno()
    out = sys.stdout.buffer
    chosen: str | None = None
    others = 0
    try:
        while True:
            chunk = sys.stdin.readline().encode() if tty else os.read(fd, UDP_CHUNK)
            if not chunk:
                break
            for _ in range(UDP_TRIES):
                sock.sendto(chunk, group)
                reply = _answer_from(sock, chosen, chunk)
                if reply is not None:
                    break
            else:
                raise ClientError(
                    f"no member of the group answered a {len(chunk)}-byte datagram after "
                    f"{UDP_TRIES} tries"
                )
            who, data, extra = reply
            others += extra
            if chosen is None:
                chosen = who
                print(f"answering: {who} (the first member of the group to answer)",
                      file=sys.stderr)  # fmt: skip
            out.write(data)
            out.flush()
    finally:
        sock.close()
    if others:
        print(f"{others} answer(s) from other members of the group, not written", file=sys.stderr)
    return 0


def _answer_from(
    sock: socket.socket, chosen: str | None, chunk: bytes
) -> tuple[str, bytes, int] | None:
    """(member, its answer, answers of others meanwhile) or None when the wait runs out."""
    others = 0
    while True:
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            return None
        who = str(addr[0])
        if chosen is None or who == chosen:
            return who, data, others
        others += 1
