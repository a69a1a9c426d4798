"""bench ``--mode churn``: connect, one echo, close, again: requests/s is connections/s. Each
connection's message differs from the one before (a server answering with an old one is
caught); the connect is non-blocking, so every connection of the worker churns at once.

Over tls:// each connection makes a full handshake (non-blocking, in the same loop), so
requests/s is handshakes/s; with ``--tls-resume`` each offers the session the one before it
got (a TLS 1.3 ticket, TLS 1.2 an ID), and the result counts how many the server resumed."""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import time

from socket_echo.kinds import kind
from socket_echo.tools.bench import errors
from socket_echo.tools.bench.loop import WOULD_BLOCK, Conn, Loop
from socket_echo.tools.connect.target import TlsOptions


class Churn(Loop):
    def serve(self) -> None:
        cfg, res = self.cfg, self.result
        tls = kind(cfg.target.scheme).tls
        self.context = (cfg.tls or TlsOptions()).context() if tls else None
        self.session: ssl.SSLSession | None = None  # --tls-resume: offered by the next one
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
                    if not isinstance(conn.sock, ssl.SSLSocket):
                        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            self.end(conn, errors.because(errors.CONNECT, os.strerror(err)))
                            continue
                        if self.context is not None:
                            self.wrap(conn)
                    if isinstance(conn.sock, ssl.SSLSocket) and not self.handshake(conn):
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
                except WOULD_BLOCK:
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
                if isinstance(conn.sock, ssl.SSLSocket) and t >= res.mono_start:
                    res.tls_handshakes += 1
                    res.tls_resumed += bool(conn.sock.session_reused)
                    if cfg.tls_resume and conn.sock.session is not None:
                        self.session = conn.sock.session  # with its ticket, after the echo
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
        except WOULD_BLOCK:
            pass
        except OSError as exc:
            if exc.errno != errno.EINPROGRESS:
                self.result.errors[errors.because(errors.CONNECT, exc.strerror or exc)] += 1
                sock.close()
                time.sleep(0.01)
                return
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def wrap(self, conn: Conn) -> None:
        """TLS on a connected socket, its handshake to be driven by the loop."""
        assert self.context is not None
        opts = self.cfg.tls or TlsOptions()
        target = self.cfg.target
        conn.sock = self.context.wrap_socket(
            conn.sock,
            server_hostname=opts.server_name or target.host,
            do_handshake_on_connect=False,
            session=self.session if self.cfg.tls_resume else None,
        )

    def handshake(self, conn: Conn) -> bool:
        """One step of the handshake: True once it is done; else the loop waits for what
        OpenSSL wants (or the connection failed, and was counted)."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.epoll.modify(sock.fileno(), select.EPOLLIN)
            return False
        except ssl.SSLWantWriteError:
            self.epoll.modify(sock.fileno(), select.EPOLLOUT)
            return False
        except (ssl.SSLError, OSError) as exc:
            self.end(conn, errors.because(errors.HANDSHAKE, exc))
            return False
        return True

    def end(self, conn: Conn, error: str) -> None:
        """This connection is done (``error``: why, if it failed); the next one begins."""
        if error:
            self.result.errors[error] += 1
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        self.epoll.unregister(fd)
        conn.sock.close()
        self.begin(conn.slot)
