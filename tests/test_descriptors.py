"""Descriptor exhaustion: keep the listeners, log (rate-limited), serve again once fds free up."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from conftest import NATIVE, echo_ok, exchange, metrics_port

from socket_echo.limits import FD_RESERVE


def low_nofile(n: int):  # type: ignore[no-untyped-def]
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def test_more_clients_than_descriptors(start_server, server_flags):
    server = start_server(*server_flags, "--no-access-log", preexec_fn=low_nofile(48))
    held = [server.connect() for _ in range(10)]
    for sock in held:
        assert exchange(sock, b"before") == b"before"
    flood = []
    for _ in range(100):
        with contextlib.suppress(OSError):
            flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
    server.wait_for_log(r"out of file descriptors")
    for sock in held:  # the open connections never stopped being served
        assert exchange(sock, b"during") == b"during"
    for sock in flood:
        sock.close()
    deadline = time.monotonic() + 10
    while not echo_ok(server.port):
        assert time.monotonic() < deadline, "no new client served after descriptors freed up"
        time.sleep(0.2)
    for sock in held:
        sock.close()
    lines = [ln for ln in server.lines if "out of file descriptors" in ln]
    assert 1 <= len(lines) <= 10, "rate-limited, not a line per connection"


BACKSTOP = textwrap.dedent("""
    import asyncio, os, sys, resource
    from socket_echo.config import ListenerSpec, ServerConfig
    from socket_echo.listeners import bind_all
    from socket_echo.loops import loop_factory
    from socket_echo.logs import setup_logging
    from socket_echo.server import EchoServer

    cfg = ServerConfig(listeners=(ListenerSpec("tcp", "127.0.0.1", 0),), loop=sys.argv[1],
                       engine=sys.argv[2])
    setup_logging("info", "text")
    bound = bind_all(cfg.listeners, cfg.backlog)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    async def main():
        server = EchoServer(cfg, bound)
        await server.start()
        print("PORT", bound[0].spec.port, flush=True)
        await asyncio.sleep(0.3)
        hog = []  # something else eats every descriptor: accept() itself meets EMFILE
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        print("EXHAUSTED", flush=True)
        await asyncio.sleep(2.0)
        for fd in hog:
            os.close(fd)
        print("FREED", flush=True)
        await asyncio.sleep(4.0)

    loop = loop_factory(cfg.loop)()
    loop.run_until_complete(main())
""")


def test_accept_meeting_emfile_recovers(server_flags):
    proc = subprocess.Popen(
        [sys.executable, "-c", BACKSTOP, server_flags[1], server_flags[3]],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, "helper died:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("PORT"):
                port = int(line.split()[1])
            if line.startswith("EXHAUSTED"):
                break
        waiting = []
        for _ in range(5):  # these meet accept() -> EMFILE
            with contextlib.suppress(OSError):
                waiting.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        time.sleep(0.5)
        while not lines[-1].startswith("FREED"):
            lines.append(proc.stdout.readline())
        deadline = time.monotonic() + 3
        while not echo_ok(port):
            assert time.monotonic() < deadline, "the server never accepted again"
            time.sleep(0.1)
        for sock in waiting:
            sock.close()
        if server_flags[1] == "asyncio" or server_flags[3] == "epoll":
            # our own accept code paused and said so (libuv's own is silent)
            proc.kill()
            rest = proc.stdout.read()
            assert "accept paused" in "".join(lines) + rest
    finally:
        proc.kill()
        proc.wait(5)


def pump(socks: list[socket.socket], seconds: float) -> int:
    """Stream on every socket at once for ``seconds``: 256 KiB writes (reads that fill the
    engine's buffer: it moves them to splice, a pipe each), echo read back and dropped."""
    import selectors

    block = b"b" * (256 << 10)
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    moved = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        for key, mask in sel.select(0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            with contextlib.suppress(BlockingIOError, ConnectionError):
                if mask & selectors.EVENT_WRITE:
                    sock.send(block)
                if mask & selectors.EVENT_READ:
                    moved += len(sock.recv(1 << 20))
    sel.close()
    return moved


@pytest.mark.native
@pytest.mark.skipif(not NATIVE, reason="splice is the native engine's")
def test_splice_pipes_count_in_the_descriptor_budget_and_health_still_answers(start_server):
    """Under ulimit -n 256, 120 streaming connections (each would hold a pipe: three
    descriptors) against a budget of ~200: the server's descriptors stay within the limit
    less its reserve (they reached all 256 before), new clients are answered, not left in
    the backlog, and /healthz answers: the budget counts every descriptor it uses."""
    server = start_server(
        "--engine", "native", "--no-access-log", "--metrics", "127.0.0.1:0",
        preexec_fn=low_nofile(256),
    )  # fmt: skip
    mport = metrics_port(server)
    streams = []
    for _ in range(120):
        with contextlib.suppress(OSError):
            streams.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
    assert pump(streams, 2.0) > 0
    in_use = len(os.listdir(f"/proc/{server.pid}/fd"))  # pipes and all: within the budget
    assert in_use <= 256 - FD_RESERVE, f"{in_use} descriptors of 256 with {len(streams)} streams"
    late = socket.socket()
    late.settimeout(3)
    try:  # refused (a reset, even before connect() returns, or EOF) or served, within 3 s
        late.connect(("127.0.0.1", server.port))
        late.sendall(b"late")
        assert late.recv(10) in (b"", b"late")
    except ConnectionResetError:
        pass
    finally:
        late.close()
    health = urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=3).read()
    assert health == b"ok\n"
    for s in streams:
        s.close()
