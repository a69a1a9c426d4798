"""bench ``--mode churn``: connect, one echo, close, again: requests/s is connections/s. Each
connection's message differs from the one before (a server answering with an old one is
caught); the connect is non-blocking, so every connection of the worker churns at once."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from socket_echo.kinds import kind
from socket_echo.tools.bench import errors
from socket_echo.tools.bench.loop import Conn, Loop


class Churn(Loop):
    def serve(self) -> None:
        cfg, res = self.cfg, self.result
        self.start()
        deadline = res.mono_start + cfg.duration
        churned = 0
        res.slots(self.n)
        for slot in range(self.n):
            self.begin(slot)
        while time.monotonic() < deadline:
            for fd, _ in self.epoll.poll(0.1):
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if not conn.connected:  # connected (or failed)
                    err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.end(conn, errors.because(errors.CONNECT, os.strerror(err)))
                        continue
                    conn.connected = True
                    churned += 1  # each connection's message differs from the one before
                    conn.expected = self.patterns.message(churned + self.index)
                    if conn.sock.family != socket.AF_UNIX:
                        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.sock.send(conn.expected)
                    self.epoll.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.end(conn, errors.because(errors.RECV, exc.strerror or exc))
                    continue
                if not data:
                    self.end(conn, errors.CLOSED_BY_SERVER)
                    continue
                conn.got += data
                if len(conn.got) < cfg.size:
                    continue
                if conn.got != conn.expected:
                    res.mismatches += 1
                    self.end(conn, "")
                    continue
                t = time.monotonic()
                res.record(int((t - conn.t0) * 1e6), t, conn.slot)
                self.end(conn, "")
            self.progress.value = res.requests
        res.bytes = res.requests * cfg.size * 2

    def begin(self, slot: int) -> None:
        """A new connection in ``slot``, its connect under way."""
        target = self.cfg.target
        unix = kind(target.scheme).unix
        family = (
            socket.AF_UNIX if unix else (socket.AF_INET6 if ":" in target.host else socket.AF_INET)
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        conn = Conn(sock)
        conn.slot = slot
        conn.t0 = time.monotonic()
        try:
            sock.connect(target.path if unix else (target.host, target.port))
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.EINPROGRESS:
                self.result.errors[errors.because(errors.CONNECT, exc.strerror or exc)] += 1
                sock.close()
                time.sleep(0.01)
                return
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def end(self, conn: Conn, error: str) -> None:
        """This connection is done (``error``: why, if it failed); the next one begins."""
        if error:
            self.result.errors[error] += 1
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        self.epoll.unregister(fd)
        conn.sock.close()
        self.begin(conn.slot)
