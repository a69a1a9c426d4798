"""The supervisor's logic in-process: restart backoff, the cgroup CPU count, summing the
workers' metrics (with a worker that hangs), and a real Supervisor given a target that
exits (uvicorn's Multiprocess target). The real server's workers are in test_workers.py."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import threading
import time

import pytest
from conftest import wait_until
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from socket_echo.config import RESTART_DELAY, RESTART_MAX_DELAY, STABLE_AFTER
from socket_echo.supervisors.cpu import cgroup_quota, cpu_count
from socket_echo.supervisors.metrics_sum import (
    WorkerTotals,
    _Fixed,
    render,
    scrape,
    sum_metrics,
)
from socket_echo.supervisors.processes import restart_delay


def test_restart_delay_doubles_with_quick_deaths_and_resets_after_a_stable_life():
    quick, delays = 0, []
    for _ in range(10):
        quick, delay = restart_delay(quick, lived=1.0)
        delays.append(delay)
    assert delays[:4] == [RESTART_DELAY, RESTART_DELAY * 2, RESTART_DELAY * 4, RESTART_DELAY * 8]
    assert delays[-1] == RESTART_MAX_DELAY and max(delays) == RESTART_MAX_DELAY
    assert restart_delay(quick, lived=STABLE_AFTER) == (0, RESTART_DELAY)


def write(root, rel: str, text: str) -> None:  # type: ignore[no-untyped-def]
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # v2: docker --cpus 1.5
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),  # no cgroup files at all (not Linux, or not mounted)
    ],
)
def test_cgroup_quota_parsing(tmp_path, files, quota):
    for rel, text in files.items():
        write(tmp_path, rel, text)
    assert cgroup_quota(str(tmp_path)) == quota


def test_cpu_count_is_capped_by_the_quota_rounded_up(tmp_path):
    write(tmp_path, "cpu.max", "50000 100000\n")
    assert cpu_count(str(tmp_path)) == 1
    cores = len(os.sched_getaffinity(0))
    write(tmp_path, "cpu.max", f"{(cores + 8) * 100000} 100000\n")
    assert cpu_count(str(tmp_path)) == cores  # a quota above the cores changes nothing


def test_sum_adds_every_series_over_workers():
    one = 'socket_echo_bytes_total{direction="in",listener="tcp://x:1"} 5.0\n'
    two = 'socket_echo_bytes_total{direction="in",listener="tcp://x:1"} 7.0\n'
    families = sum_metrics([one, two, ""])
    samples = [s for f in families for s in f.samples]
    assert [(s.name, s.value) for s in samples] == [("socket_echo_bytes_total", 12.0)]


def worker_text(opened: int, active: int) -> str:
    """A worker's /metrics text, as prometheus_client writes it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        _Fixed(
            [
                CounterMetricFamily("socket_echo_connections_opened", "", value=opened),
                GaugeMetricFamily("socket_echo_connections_active", "", value=active),
            ]
        )
    )
    return generate_latest(registry).decode()


def sample(totals: WorkerTotals, paths: list[str], name: str) -> float:
    return sum(s.value for f in totals.metrics(paths) for s in f.samples if s.name == name)


def test_a_dead_workers_counters_stay_in_the_sum_and_its_gauges_go():
    """SIGKILL one of two workers: opened_total went 600 -> 323 and stayed there. Now what
    it counted stays; what it held open (a gauge) is gone with it."""
    totals = WorkerTotals()
    totals.last = {"a": worker_text(300, 5), "b": worker_text(300, 7)}
    opened, active = "socket_echo_connections_opened_total", "socket_echo_connections_active"
    assert sample(totals, ["a", "b"], opened) == 600
    totals.retire("b")  # b died; its replacement has counted 23 so far
    totals.last["b"] = worker_text(23, 1)
    assert sample(totals, ["a", "b"], opened) == 623
    assert sample(totals, ["a", "b"], active) == 6
    totals.retire("b")  # and died again before a scrape saw it: nothing counted twice
    totals.retire("b")
    assert sample(totals, ["a"], opened) == 623
    assert sample(totals, ["a"], active) == 5


def test_a_worker_that_never_answers_costs_one_timeout_not_the_loop(tmp_path):
    """A hung worker: its socket accepts (the kernel's backlog) but nobody reads."""
    path = str(tmp_path / "hung.sock")
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(path)
    hung.listen(4)

    async def main() -> tuple[str, float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        text = await scrape(path, timeout=0.3)
        task.cancel()
        return text, time.monotonic() - started, ticks

    text, elapsed, ticks = asyncio.run(main())
    hung.close()
    assert text == "" and 0.25 <= elapsed < 1.5
    assert ticks >= 10  # the loop kept running meanwhile

    body = asyncio.run(render(1, 3, [str(tmp_path / "gone.sock")], WorkerTotals()))
    assert b"socket_echo_workers 1.0" in body and b"socket_echo_worker_restarts_total 3.0" in body


def supervise(target, seconds: float) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """A real Supervisor (it forks) with one worker running ``target``, stopped by SIGTERM
    after ``seconds``: (its exit code, its restarts)."""
    import os
    import signal
    import threading

    from socket_echo.config import ServerConfig
    from socket_echo.supervisors.processes import Supervisor

    sup = Supervisor(ServerConfig(listeners=()), 1, [], [], [], target=target)
    stop = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    stop.start()
    try:
        return sup.run(), sup.restarts
    finally:
        stop.cancel()


def test_a_worker_that_exits_after_serving_is_restarted_with_a_doubling_delay(tmp_path):
    import time

    starts = tmp_path / "starts"

    def serve_briefly(config, listeners, credentials, private, serving):  # type: ignore[no-untyped-def]
        serving()  # ready, then gone at once: a worker that keeps dying
        with open(starts, "a") as f:
            f.write(f"{time.monotonic()}\n")
        return 0

    code, restarts = supervise(serve_briefly, 2.2)
    times = [float(t) for t in starts.read_text().split()]
    assert code == 0 and restarts == len(times) - 1 >= 2
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0  # RESTART_DELAY, then doubled


def test_a_worker_that_never_serves_stops_the_supervisor_instead_of_restarting():
    def fail_to_start(config, listeners, credentials, private, serving):  # type: ignore[no-untyped-def]
        return 1  # never said it serves (readiness comes once a worker serves, not before)

    code, restarts = supervise(fail_to_start, 5.0)
    assert (code, restarts) == (1, 0)


def test_the_supervisor_leaves_the_udp_group_before_any_worker_joins_it(tmp_path):
    """A bound UDP socket in an SO_REUSEPORT group takes a share of the datagrams, and the
    group's size is in the hash: the supervisor's socket leaving once the workers served
    moved sessions between them (a DTLS handshake begun on one went on at the other, which
    dropped it: 3 runs in ~180 had a client with no handshake). Each worker, as it starts, looks in
    its supervisor's descriptors for the socket the supervisor bound: it must be gone."""
    from socket_echo.config import ListenerSpec, ServerConfig
    from socket_echo.listeners import BindOptions, bind_all
    from socket_echo.supervisors.processes import Supervisor

    placeholder = bind_all(
        (ListenerSpec("udp", "127.0.0.1", 0),), BindOptions(16, reuse_port=True, listen=False)
    )
    inode = os.fstat(placeholder[0].sock.fileno()).st_ino
    seen = tmp_path / "seen"

    def look(config, listeners, credentials, private, serving):  # type: ignore[no-untyped-def]
        fds = f"/proc/{os.getppid()}/fd"
        held = [fd for fd in os.listdir(fds) if _link(f"{fds}/{fd}") == f"socket:[{inode}]"]
        with open(seen, "a") as f:
            f.write(f"{len(listeners)} {len(held)}\n")
        serving()
        signal.pause()  # until the supervisor forwards SIGTERM (its default action: exit)
        return 0

    def stop_once_both_looked() -> None:
        try:
            wait_until(lambda: seen.exists() and seen.read_text().count("\n") >= 2, 15, "workers")
        finally:  # a worker that never looked fails the assertion below, not a hang
            os.kill(os.getpid(), signal.SIGTERM)

    sup = Supervisor(ServerConfig(listeners=()), 2, [], placeholder, [], target=look)
    threading.Thread(target=stop_once_both_looked, daemon=True).start()
    sup.run()
    lines = seen.read_text().split("\n")[:-1]
    assert lines == ["1 0", "1 0"], lines  # each worker bound its own; none saw the parent's


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed while we looked
        return ""
