"""--metrics: Prometheus /metrics, /healthz, /readyz (503 from the moment a drain starts)."""

from __future__ import annotations

import asyncio
import signal
import socket
import urllib.error
import urllib.request

from conftest import assert_one_line_error, exchange, metrics_port, run_cli

from socket_echo.config import HTTP_MAX_REQUEST
from socket_echo.metrics import HealthHttp, health_factory


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(body: str, name: str, **labels: str) -> float:
    for line in body.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{body}")


def test_metrics_count_connections_bytes_and_datagrams(start_server, server_flags):
    server = start_server(*server_flags, "--metrics", "127.0.0.1:0", expect_listeners=2)
    mport = metrics_port(server)
    tcp = f"tcp://127.0.0.1:{server.port}"
    for _ in range(3):
        with server.connect() as sock:
            assert exchange(sock, b"x" * 1000) == b"x" * 1000
    held = server.connect()
    assert exchange(held, b"12345") == b"12345"
    _, host, uport = server.listener("udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        u.sendto(b"dgram", (host, uport))
        assert u.recv(10) == b"dgram"
    server.wait_for_log(r"connection #3 from .* closed")
    status, body = get(mport, "/metrics")
    assert status == 200
    assert sample(body, "socket_echo_connections_opened_total", listener=tcp) == 4
    assert (
        sample(body, "socket_echo_connections_closed_total", listener=tcp, reason="peer closed")
        == 3
    )
    assert sample(body, "socket_echo_connections_active") == 1
    assert sample(body, "socket_echo_bytes_total", listener=tcp, direction="in") == 3005
    assert sample(body, "socket_echo_udp_datagrams_total", direction="in") == 1
    assert sample(body, "socket_echo_udp_datagrams_total", direction="out") == 1
    assert sample(body, "socket_echo_connection_duration_seconds_count") == 3
    held.close()
    server.wait_for_log(r"connection #4 from .* closed")


def test_health_probes_never_write_to_the_log(start_server):
    server = start_server("--metrics", "127.0.0.1:0")
    mport = metrics_port(server)
    server.wait_for_log(r"metrics and health on")  # the last start-up line
    before = len(server.lines)
    for _ in range(20):
        for path in ("/healthz", "/readyz", "/metrics"):
            assert get(mport, path)[0] == 200
    with server.connect() as sock:  # a marker: a line the log writes after the probes'
        assert exchange(sock, b"marker") == b"marker"
    server.wait_for_log(r"connection #1 from .* closed")
    after = [ln for ln in server.lines[before:] if "connection #1" not in ln]
    assert after == []  # no line of the 60 probes


def test_readyz_turns_503_when_the_drain_starts_healthz_stays_200(start_server):
    server = start_server("--metrics", "127.0.0.1:0", "--graceful-timeout", "30")
    mport = metrics_port(server)
    assert get(mport, "/healthz") == (200, "ok\n")
    assert get(mport, "/readyz") == (200, "ready\n")
    held = server.connect()
    assert exchange(held, b"hold") == b"hold"
    server.signal(signal.SIGTERM)
    server.wait_for_log(r"no longer accepting")
    assert get(mport, "/readyz") == (503, "draining\n")
    assert get(mport, "/healthz") == (200, "ok\n")
    assert get(mport, "/nope")[0] == 404
    held.close()
    assert server.wait(10) == 0


def test_bad_metrics_address_is_usage_error():
    assert_one_line_error(run_cli("--metrics", "9100"), 2, "HOST:PORT")


def test_idle_connections_to_the_endpoint_cannot_keep_a_probe_out(start_server):
    """400 connections to /metrics's port that never ask anything: they do not take the
    server's descriptors (at most METRICS_MAX_CONNECTIONS are kept, the oldest idle one
    makes room), and /healthz still answers at once."""
    import psutil

    from socket_echo.config import METRICS_MAX_CONNECTIONS

    server = start_server("--metrics", "127.0.0.1:0")
    port = metrics_port(server)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(400)]
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3).read()
        assert body == b"ok\n"
        held = [c for c in psutil.Process(server.pid).net_connections() if c.laddr.port == port]
        assert len([c for c in held if c.status == "ESTABLISHED"]) <= METRICS_MAX_CONNECTIONS
    finally:
        for s in idle:
            s.close()


def test_a_request_waiting_for_its_answer_holds_no_more_than_its_head():
    """While a scrape waited (a stopped worker: 2 s), 16 connections that kept sending pushed
    the supervisor to 418 MiB: each appended all it got. Now a complete request stops the
    reading: the rest stays in the kernel's buffers and the sender blocks."""

    async def main() -> tuple[list[int], list[int], bytes]:
        loop = asyncio.get_running_loop()
        release = asyncio.Event()

        async def render() -> bytes:
            await release.wait()
            return b"socket_echo_up 1\n"

        factory = health_factory(render, lambda: "", loop)
        made: list[HealthHttp] = []

        def make() -> HealthHttp:
            made.append(factory())
            return made[-1]

        server = await loop.create_server(make, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            sock.setblocking(False)
            clients.append(sock)
        sent = [0] * len(clients)
        chunk = b"j" * 65536
        blocked_since: dict[int, float] = {}
        deadline = loop.time() + 20
        while len(blocked_since) < len(clients) or min(blocked_since.values()) > loop.time() - 0.3:
            assert loop.time() < deadline and max(sent) < 256 << 20, "the server kept reading"
            for i, sock in enumerate(clients):
                try:
                    sent[i] += sock.send(chunk)
                    blocked_since.pop(i, None)
                except BlockingIOError:
                    blocked_since.setdefault(i, loop.time())
            await asyncio.sleep(0.002)
        held = [len(p.buf) for p in made]
        release.set()
        for sock in clients:
            sock.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # the endpoint serves on
        writer.close()
        server.close()
        return sent, held, answer

    sent, held, answer = asyncio.run(main())
    assert all(n <= HTTP_MAX_REQUEST + 1 for n in held), held
    assert max(sent) < 64 << 20, sent  # the kernel's buffers, not the server's memory
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"socket_echo_up 1\n")
