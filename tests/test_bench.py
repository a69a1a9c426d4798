"""bench: verifies every byte, reports the figures, exits 1 on corruption or silence."""

from __future__ import annotations

import json

import pytest
from tools_helpers import Broken, tool

pytestmark = pytest.mark.native  # the sanitizer gates run these


FIELDS = {
    "requests_per_second",
    "megabytes_per_second",
    "latency_us",
    "errors",
    "mismatches",
    "client_cpu_percent",
    "parameters",
}


# The ping-pong loop runs in C where the extension is built (tools/_native.c); its Python
# twin runs with SOCKET_ECHO_NO_EXTENSIONS=1. Both are held to the same behaviour.
LOOPS = [{}, {"SOCKET_ECHO_NO_EXTENSIONS": "1"}]
LOOP_IDS = ["native-if-built", "pure"]


def bench(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    """bench with ``--json -``: stdout is the JSON alone (``| jq`` works), the table goes to
    stderr; a run that ends before any result (exit 2) prints no JSON."""
    result = tool("bench", *args, "--json", "-", env=env)
    out = result.stdout.decode()
    return result.returncode, json.loads(out) if out.strip() else {}, result.stderr.decode()


@pytest.mark.parametrize(
    ("mode", "env"),
    [("pingpong", LOOPS[0]), ("pingpong", LOOPS[1]), ("stream", {}), ("churn", {})],
    ids=["pingpong-native-if-built", "pingpong-pure", "stream", "churn"],
)
def test_modes_against_our_server(start_server, mode, env):
    server = start_server()
    code, report, table = bench(
        f"127.0.0.1:{server.port}", "--mode", mode, "-c", "4", "-d", "0.5", "-p", "1", env=env
    )
    assert code == 0, report
    assert report.keys() >= FIELDS
    assert report["errors"] == 0 and report["mismatches"] == 0
    assert report["requests_per_second"] > 0 and report["megabytes_per_second"] > 0
    if mode != "stream":
        lat = report["latency_us"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert report["parameters"]["connections"] == 4
    assert "latency" in table or "MB/s" in table, table  # the table went to stderr


def test_open_loop_rate_and_processes(start_server):
    server = start_server()
    code, report, _ = bench(
        f"127.0.0.1:{server.port}", "--rate", "400", "-c", "4", "-d", "1", "-p", "2"
    )
    assert code == 0, report
    assert 200 < report["requests_per_second"] < 600  # held near the asked rate
    assert report["parameters"]["rate"] == 400


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize("mode", ["drop", "reorder"])
def test_corrupting_servers_are_caught(mode, env):
    server = Broken(mode)
    try:
        code, report, _ = bench(
            f"127.0.0.1:{server.port}",
            "--mode",
            "stream",
            "-c",
            "2",
            "-s",
            "4096",
            "-d",
            "0.5",
            "-p",
            "1",
        )
        assert code == 1 and report["mismatches"] > 0
        code, report, _ = bench(
            f"127.0.0.1:{server.port}",
            "-c",
            "2",
            "-s",
            "1000",
            "-d",
            "0.5",
            "-p",
            "1",
            "--timeout",
            "0.3",
            env=env,
        )
        assert code == 1 and report["mismatches"] + report["errors"] > 0
    finally:
        server.close()


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_mute_server_is_caught(env):
    server = Broken("mute")
    try:
        code, report, _ = bench(
            f"127.0.0.1:{server.port}",
            "-c",
            "2",
            "-d",
            "0.5",
            "--timeout",
            "0.2",
            "-p",
            "1",
            env=env,
        )
        assert code == 1 and report["errors"] > 0 and report["requests_per_second"] == 0
    finally:
        server.close()


def test_udp_mode():
    server = Broken("udp")
    try:
        code, report, _ = bench(f"udp://127.0.0.1:{server.port}", "-c", "4", "-d", "0.5", "-p", "1")
        assert code == 0, report
        assert report["mode"] == "udp" and report["requests_per_second"] > 0
    finally:
        server.close()


def test_plot_draws_a_png(start_server, tmp_path):
    server = start_server()
    png = tmp_path / "latency.png"
    code, _, _ = bench(
        f"127.0.0.1:{server.port}", "-c", "2", "-d", "0.3", "-p", "1", "--plot", str(png)
    )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unwritable_result_files_are_one_line_before_the_run(start_server, tmp_path):
    server = start_server()
    for flag in ("--json", "--plot"):
        result = tool(
            "bench", f"127.0.0.1:{server.port}", "-d", "5", flag, str(tmp_path / "missing" / "out")
        )
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert b"not a writable folder" in result.stderr


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_a_failed_send_keeps_the_connection_count(env):
    """Each connection is reset after one echo: the replacement must get a message too,
    or with -c 1 the load stops after the first failure."""
    server = Broken("once")
    try:
        code, report, _ = bench(
            f"127.0.0.1:{server.port}", "-c", "1", "-d", "1", "-p", "1", env=env
        )
    finally:
        server.close()
    assert code == 1 and report["errors"] > 0
    assert report["requests_per_second"] >= 20, report  # ~1 before the fix


@pytest.mark.parametrize("native", [True, False], ids=["native-if-built", "pure"])
def test_a_send_the_server_never_takes_ends_on_time(monkeypatch, native):
    """A server that never reads, and a send buffer too small for one message: the rest of
    the message must not block past the timeout (it was a blocking sendall, no timeout).
    In-process, to give the load generator's sockets a 4 KiB send buffer."""
    import socket
    import time
    import types

    from socket_echo.tools import bench as tool
    from socket_echo.tools.target import parse_target

    if not native:
        monkeypatch.setenv("SOCKET_ECHO_NO_EXTENSIONS", "1")
    server = Broken("deaf")
    try:
        cfg = tool.BenchConfig(
            parse_target(f"127.0.0.1:{server.port}"), size=65536, duration=1.0, timeout=0.5
        )
        worker = tool.Worker(cfg, 2, 0, types.SimpleNamespace(value=0))
        plain_open = worker._open

        def small_buffer_open():  # type: ignore[no-untyped-def]
            conn = plain_open()
            if conn is not None:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            return conn

        worker._open = small_buffer_open  # type: ignore[method-assign]
        started = time.monotonic()
        result = worker.run()
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert elapsed < 3, elapsed  # the run's duration and one timeout, not for ever
    assert result.requests == 0
    assert result.errors["no complete answer within the timeout"] >= 2
