"""--workers and --fd: a supervisor, worker processes sharing the listeners, socket activation."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest
from conftest import (
    assert_one_line_error,
    echo_ok,
    http_status,
    metrics_port,
    poll_scrape,
    run_cli,
    scrape,
    total,
    wait_until,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork()")

WORKER_RE = re.compile(r"\[worker (\d+)\] connection #\d+ from [^:]+:(\d+)")


def start_workers(start_server, *args: str):  # type: ignore[no-untyped-def]
    server = start_server("--workers", "2", "--metrics", "127.0.0.1:0", *args, expect_listeners=2)
    deadline = time.monotonic() + 15
    while len(server.children()) < 2 or len(server.listeners) < 4:  # tcp + udp per worker
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)
        server.listeners = server._parse_listeners()
    return server


def owners(server, clients: list[socket.socket]) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """Client local port -> worker number, from the access log."""
    ports = {c.getsockname()[1] for c in clients}
    deadline = time.monotonic() + 10
    while True:
        found = {int(m.group(2)): int(m.group(1)) for m in map(WORKER_RE.search, server.lines) if m}
        if ports <= found.keys():
            return {p: found[p] for p in ports}
        assert time.monotonic() < deadline, server.log
        time.sleep(0.05)


def test_connections_land_on_both_workers_and_metrics_sum_them(start_server):
    server = start_workers(start_server)
    clients = [server.connect() for _ in range(40)]
    for i, c in enumerate(clients):
        assert echo_ok(c, b"x" * (i + 1))
    assert set(owners(server, clients).values()) == {1, 2}
    m = scrape(metrics_port(server))
    assert m["socket_echo_workers"] == 2
    assert m["socket_echo_connections_active"] == 40
    assert m[
        f'socket_echo_bytes_total{{direction="in",listener="tcp://127.0.0.1:{server.port}"}}'
    ] == sum(range(1, 41))
    for c in clients:
        c.close()


def test_udp_is_shared_and_every_datagram_answered_once(start_server):
    server = start_workers(start_server)
    _, host, port = server.listener("udp")
    socks = []
    for i in range(40):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        s.sendto(i.to_bytes(2, "big"), (host, port))
        socks.append(s)
    for i, s in enumerate(socks):
        assert s.recvfrom(10)[0] == i.to_bytes(2, "big")
        s.settimeout(0.05)
        with pytest.raises(TimeoutError):
            s.recvfrom(10)  # exactly one answer
        s.close()
    m = scrape(metrics_port(server))
    assert m['socket_echo_udp_datagrams_total{direction="out"}'] == 40


def test_killing_a_worker_loses_no_other_connection_and_it_comes_back(start_server):
    server = start_workers(start_server)
    clients = [server.connect() for _ in range(30)]
    for c in clients:
        assert echo_ok(c, b"before")
    owner = owners(server, clients)
    assert set(owner.values()) == {1, 2}
    victim = server.children()[0]
    victim_worker = int(server.wait_for_log(rf"worker (\d+) started \(pid {victim.pid}\)").group(1))
    victim.kill()
    server.wait_for_log(rf"worker {victim_worker} was killed by SIGKILL .*restarting in")
    for c in clients:
        ok = echo_ok(c, b"after the kill")
        if owner[c.getsockname()[1]] != victim_worker:
            assert ok, "a connection on the surviving worker was lost"
    deadline = time.monotonic() + 15
    while len(server.children()) < 2 or victim.pid in [p.pid for p in server.children()]:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.1)
    mport = metrics_port(server)
    while scrape(mport)["socket_echo_workers"] < 2:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.1)
    assert scrape(mport)["socket_echo_worker_restarts_total"] == 1
    udp_lines = rf"\[worker {victim_worker}\] UDP echo server listening"
    assert len(re.findall(udp_lines, server.log)) == 2, "the restarted worker serves UDP too"
    fresh = [server.connect() for _ in range(30)]
    for c in fresh:
        assert echo_ok(c, b"new")
    assert victim_worker in set(owners(server, fresh).values()), "the restarted worker serves"
    for c in clients + fresh:
        c.close()


def test_a_killed_workers_counters_never_leave_the_sum(start_server):
    """SIGKILL one of two workers: socket_echo_connections_opened_total went 600 -> 323 and
    stayed there after the restart (a counter stepping back). It never decreases now."""
    server = start_workers(start_server)
    mport = metrics_port(server)
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            assert echo_ok(sock, b"count me")
    opened = "socket_echo_connections_opened_total"
    before = total(poll_scrape(server, lambda m: total(m, opened) >= 30), opened)
    assert before >= 30
    victim, _ = server.children()
    victim.kill()
    seen = [before]

    def restarted() -> bool:  # every scrape on the way is kept: none may step back
        m = scrape(mport)
        seen.append(total(m, opened))
        return total(m, "socket_echo_worker_restarts_total") >= 1 and m["socket_echo_workers"] == 2

    wait_until(restarted, 15, "the worker restarted", every=0.05)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        assert echo_ok(sock, b"and me")
    seen.append(total(poll_scrape(server, lambda m: total(m, opened) > before), opened))
    assert all(b >= a for a, b in itertools.pairwise(seen)), seen
    assert seen[-1] >= before + 1, seen


def test_sigterm_drains_every_worker(start_server):
    server = start_workers(start_server, "--graceful-timeout", "20")
    mport = metrics_port(server)
    clients = [server.connect() for _ in range(20)]
    for c in clients:
        assert echo_ok(c, b"hi")
    assert set(owners(server, clients).values()) == {1, 2}
    assert http_status(mport, "/readyz") == 200
    server.signal(signal.SIGTERM)
    server.wait_for_log(r"supervisor: SIGTERM: draining 2 worker")
    assert http_status(mport, "/readyz") == 503
    time.sleep(0.3)
    for c in clients:  # both workers still serve their open connections while draining
        assert echo_ok(c, b"still here")
    with pytest.raises(OSError):
        server.connect(timeout=1)
    for c in clients:
        c.close()
    assert server.wait(30) == 0
    assert "all workers stopped (0 restart(s))" in server.log
    assert server.log.count("stopped: ") >= 2  # each worker's own summary


def test_worker_count_is_checked():
    assert_one_line_error(
        run_cli("--workers", "none"), 2, "--workers 'none': expected a positive number or 'auto'"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_inherited_sockets_are_served(start_server, workers):
    """--fd: a TCP and a UDP socket made by us (as systemd would) and passed in."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fds = (tcp.fileno(), udp.fileno())
    server = start_server(
        "--fd",
        str(fds[0]),
        "--fd",
        str(fds[1]),
        "--workers",
        workers,
        host="",
        pass_fds=fds,
        expect_listeners=2,
    )
    port = tcp.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        assert echo_ok(c, b"activated")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(2)
    probe.sendto(b"dgram", udp.getsockname())
    assert probe.recvfrom(10)[0] == b"dgram"
    probe.close()
    tcp.close()
    udp.close()
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0


def test_fd_that_is_not_a_listening_socket_is_one_line(tmp_path):
    with open(tmp_path / "file", "w") as f:
        fd = f.fileno()
        result = run_cli("--fd", str(fd), pass_fds=(fd,))
    assert_one_line_error(result, 1, f"--fd {fd}: not an open socket (Socket operation on")
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    with idle:
        result = run_cli("--fd", str(idle.fileno()), pass_fds=(idle.fileno(),))
    assert_one_line_error(result, 1, "the socket is not listening")


def test_workers_die_with_a_killed_supervisor(start_server):
    server = start_workers(start_server)
    kids = server.children()
    server.proc.kill()
    server.proc.wait(5)
    _, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive, "workers outlived their supervisor"


def test_unix_listener_is_inherited_by_workers_and_removed_by_the_supervisor(
    start_server, tmp_path
):
    path = tmp_path / "echo.sock"
    server = start_server(
        "--workers", "2", "--log-format", "json", "--bind", f"unix://{path}", expect_listeners=2
    )
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(str(path))
        assert echo_ok(c, b"over unix")
    line = server.wait_for_log(r'"event":"connection_open".*')
    assert '"worker":' in line.group(0)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert not path.exists()


def test_a_hung_worker_delays_neither_readyz_nor_signals(start_server):
    """SIGSTOP one worker: /metrics waits for it at most SCRAPE_TIMEOUT, and meanwhile the
    supervisor's loop answers /readyz at once and forwards SIGTERM (it scrapes asynchronously)."""
    import threading

    from socket_echo.config import SCRAPE_TIMEOUT

    server = start_workers(start_server)
    mport = metrics_port(server)
    hung, _ = server.children()
    hung.suspend()
    try:
        wait_until(  # the watch sees it first: /readyz names it
            lambda: http_status(mport, "/readyz") == 503, 10, "/readyz 503 for a stopped worker"
        )
        supervisor = psutil.Process(server.pid)
        fds_before = supervisor.num_fds()
        slow: list[float] = []
        fetch_started = time.monotonic()

        def fetch_metrics() -> None:
            scrape(mport)
            slow.append(time.monotonic() - fetch_started)

        fetcher = threading.Thread(target=fetch_metrics)
        fetcher.start()
        # the scrape waits for the hung worker: the supervisor holds the scrape's HTTP
        # connection and its own to the worker (polled, not slept for)
        wait_until(lambda: supervisor.num_fds() >= fds_before + 2, 10, "a scrape under way")
        started = time.monotonic()
        assert http_status(mport, "/readyz") == 503  # at once, while the scrape waits
        answered = time.monotonic()
        assert answered - started < SCRAPE_TIMEOUT / 2
        fetcher.join(SCRAPE_TIMEOUT + 5)
        assert slow and SCRAPE_TIMEOUT * 0.8 <= slow[0] < SCRAPE_TIMEOUT + 2
        assert answered < fetch_started + slow[0]  # /readyz came back during the scrape
        server.signal(signal.SIGTERM)  # forwarded to both; the stopped one drains on SIGCONT
        server.wait_for_log(r"SIGTERM: draining 2 worker", timeout=2)
    finally:
        hung.resume()
    assert server.wait(20) == 0


def test_a_stopped_worker_is_stale_in_metrics_and_makes_readyz_fail(start_server):
    """SIGSTOP one of two workers: summed counters keep its last scrape (never going back,
    which Prometheus would read as a counter reset), the stale gauge says so, and /readyz
    says a worker is not answering (connections the kernel routes to it would hang); once
    it is continued, /readyz is 200 again."""
    server = start_workers(start_server)
    mport = metrics_port(server)
    for _ in range(20):  # connections on both workers
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            assert echo_ok(sock, b"count me")
    deadline = time.monotonic() + 10
    while total(scrape(mport), "socket_echo_connections_opened_total") < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = total(scrape(mport), "socket_echo_connections_opened_total")
    hung, _ = server.children()
    hung.suspend()
    try:
        deadline = time.monotonic() + 10
        while http_status(mport, "/readyz") != 503:
            assert time.monotonic() < deadline, "/readyz stayed 200 with a stopped worker"
            time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=5)
        assert refused.value.code == 503
        assert re.fullmatch(rb"worker \d not answering\n", refused.value.read())
        m = scrape(mport)
        assert total(m, "socket_echo_connections_opened_total") == before  # not 105 of 200
        assert total(m, "socket_echo_workers_stale") == 1
    finally:
        hung.resume()
    deadline = time.monotonic() + 10
    while http_status(mport, "/readyz") != 200:
        assert time.monotonic() < deadline, "/readyz did not recover"
        time.sleep(0.1)
