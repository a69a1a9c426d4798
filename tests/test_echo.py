"""Byte-exact echo over real sockets: every byte value, any write size, many clients at once."""

from __future__ import annotations

import os
import random
import socket
import threading

import pytest
from conftest import exchange, recv_until_eof

SIZES = [1, 2, 127, 128, 129, 1024, 1500, 65536, 1 << 20, 16 << 20]


def test_every_byte_value_comes_back(shared_server, server_flags):
    server = shared_server(*server_flags)
    data = bytes(range(256)) * 64 + b"\x00\xff\x00" + b"\r\n\n\x04"
    with server.connect() as sock:
        assert exchange(sock, data) == data


@pytest.mark.parametrize("size", SIZES)
def test_single_write_of_any_size_is_echoed_exactly(shared_server, size):
    server = shared_server()
    data = os.urandom(size)
    with server.connect() as sock:
        assert exchange(sock, data, chunk=size) == data


def test_bytes_go_back_as_they_arrive_without_waiting_for_a_line(shared_server):
    server = shared_server()
    with server.connect() as sock:
        for piece in (b"a", b"no newline", b"\x00"):
            sock.sendall(piece)
            assert sock.recv(100) == piece


def test_hundred_concurrent_clients_each_get_their_own_stream(start_server, server_flags):
    server = start_server(*server_flags)
    failures: list[str] = []
    barrier = threading.Barrier(100)

    def client(n: int) -> None:
        rng = random.Random(n)
        try:
            with server.connect() as sock:
                barrier.wait(10)
                for _ in range(20):
                    data = rng.randbytes(rng.randint(1, 20000))
                    if exchange(sock, data) != data:
                        failures.append(f"client {n}: mismatch")
                        return
        except Exception as exc:
            failures.append(f"client {n}: {exc!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    assert "connection #100 from" in server.log


def test_default_listens_on_ipv4_and_ipv6_localhost_on_one_port(start_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = start_server(host="", expect_listeners=2)
    hosts = {h for _, h, _ in server.listeners}
    ports = {p for _, _, p in server.listeners}
    assert hosts == {"127.0.0.1", "::1"} and len(ports) == 1
    for host in ("127.0.0.1", "::1"):
        with server.connect(host) as sock:
            assert exchange(sock, b"hello " + host.encode()) == b"hello " + host.encode()


def test_any_address_is_one_dual_stack_socket_like_the_seed(start_server):
    server = start_server("--host", "::", expect_listeners=2)
    assert sorted(scheme for scheme, _, _ in server.listeners) == ["tcp", "udp"]
    assert "dual-stack" in server.log
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        assert exchange(sock, b"via ipv4") == b"via ipv4"
    # the IPv4 client arrived mapped; the log shows its plain IPv4 address
    server.wait_for_log(r"connection #1 from 127\.0\.0\.1:\d+$")


def test_bind_urls_replace_host_and_port(start_server):
    server = start_server(
        "--bind", "tcp://127.0.0.1:0", "--bind", "tcp://[::1]:0", expect_listeners=2
    )
    assert [h for _, h, _ in server.listeners] == ["127.0.0.1", "::1"]
    for _, host, port in server.listeners:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"x"


def test_server_sets_tcp_nodelay_on_every_connection(server_flags):
    """In-process, to look at the server's own socket: no Nagle stall on small echoes."""
    import asyncio

    from socket_echo.config import ListenerSpec, ServerConfig
    from socket_echo.listeners import bind_all
    from socket_echo.loops import loop_factory
    from socket_echo.server import EchoServer

    loop_name, engine = server_flags[1], server_flags[3]
    cfg = ServerConfig(
        listeners=(ListenerSpec("tcp", "127.0.0.1", 0),), loop=loop_name, engine=engine
    )
    bound = bind_all(cfg.listeners, cfg.backlog)
    loop = loop_factory(loop_name)()

    async def check() -> int:
        server = EchoServer(cfg, bound)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", bound[0].spec.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        server.table.list_all()  # the native path's connection objects, made now if not yet
        (conn,) = server.table.open
        transport = getattr(conn, "transport", None)  # the protocol path's
        if hasattr(conn, "handle"):  # native: the engine's descriptor, in its handle
            sock = socket.socket(fileno=os.dup(conn.handle & 0xFFFFFFFF))
        else:
            sock = conn.sock if transport is None else transport.get_extra_info("socket")  # type: ignore[attr-defined]
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if transport is None and not hasattr(conn, "sock"):
            sock.close()
        writer.close()
        await server.stop_accepting()
        await server.drain()
        return int(nodelay)

    try:
        assert loop.run_until_complete(check()) != 0
    finally:
        loop.close()
