"""Descriptor exhaustion: keep the listeners, log (rate-limited), serve again once fds free up."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import textwrap
import time

from conftest import exchange


def low_nofile(n: int):  # type: ignore[no-untyped-def]
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def echo_ok(port: int, payload: bytes = b"ping", timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            return exchange(sock, payload) == payload
    except OSError:
        return False


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
