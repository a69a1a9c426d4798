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
    if "-p" not in args:  # one load process: the tests check figures, not the machine's speed
        args = (*args, "-p", "1")
    result = tool("bench", *args, "--json", "-", env=env)
    out = result.stdout.decode()
    return result.returncode, json.loads(out) if out.strip() else {}, result.stderr.decode()


@pytest.mark.parametrize(
    ("mode", "env"),
    [("pingpong", LOOPS[0]), ("pingpong", LOOPS[1]), ("stream", {}), ("churn", {})],
    ids=["pingpong-native-if-built", "pingpong-pure", "stream", "churn"],
)
def test_modes_against_our_server(shared_server, mode, env):
    server = shared_server()
    code, report, table = bench(
        f"127.0.0.1:{server.port}", "--mode", mode, "-c", "4", "-d", "0.25", "-p", "1", env=env
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


def test_open_loop_rate_and_processes(shared_server):
    server = shared_server()
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
            "0.3",
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
            "0.3",
            "-p",
            "1",
            "--timeout",
            "0.1",  # within the 0.3 s run: the message short of a byte times out
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
        code, report, _ = bench(f"udp://127.0.0.1:{server.port}", "-c", "4", "-d", "0.25")
        assert code == 0, report
        assert report["mode"] == "udp" and report["requests_per_second"] > 0
    finally:
        server.close()


def test_unwritable_result_files_are_one_line_before_the_run(shared_server, tmp_path):
    server = shared_server()
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
            f"127.0.0.1:{server.port}", "-c", "1", "-d", "0.5", "-p", "1", env=env
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

    from socket_echo.tools.bench.model import BenchConfig
    from socket_echo.tools.bench.pingpong import pingpong_loop
    from socket_echo.tools.connect.target import parse_target

    if not native:
        monkeypatch.setenv("SOCKET_ECHO_NO_EXTENSIONS", "1")
    server = Broken("deaf")
    try:
        cfg = BenchConfig(
            target=parse_target(f"127.0.0.1:{server.port}"),
            size=65536,
            duration=1.0,
            timeout=0.5,
            drain_timeout=0.3,
        )
        worker = pingpong_loop(cfg)(cfg, 2, 0.0, 0, types.SimpleNamespace(value=0))
        plain_connect = worker.connect

        def small_buffer_connect():  # type: ignore[no-untyped-def]
            sock = plain_connect()
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            return sock

        worker.connect = small_buffer_connect  # type: ignore[method-assign]
        started = time.monotonic()
        result = worker.run()
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert elapsed < 3, elapsed  # the duration, one timeout and the drain, not for ever
    assert result.resets_sent == 2  # it never read: the end had to reset, and says so
    assert result.requests == 0
    assert result.errors["no complete answer within the timeout"] >= 2


# -- the open loop: a schedule kept, both figures, pipelining, warm-up ----------------------


def delayed_server(start_server, delay: str):  # type: ignore[no-untyped-def]
    server = start_server("--bind", f"tcp://127.0.0.1:0?delay={delay}")
    _, host, port = server.listener()
    return f"{host}:{port}"


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_open_loop_pipelines_through_a_slow_server_and_keeps_its_schedule(start_server, env):
    """A 30 ms echo, each connection asked for a request every 10 ms: only several in flight
    per connection keep the schedule; every echo is matched by position and verified."""
    target = delayed_server(start_server, "30ms")
    code, report, _ = bench(target, "--rate", "200", "-c", "2", "-d", "1", "-p", "1", env=env)
    assert code == 0, report
    assert report["mismatches"] == 0 and report["errors"] == 0
    assert report["held_sends"] == 0  # the window (16 in flight) never filled
    # 200 slots in the window (one more at an edge); a loop that wakes late under a loaded
    # machine has been seen to count 203: noted, not understood yet (the closing note)
    assert 150 <= report["sends"] <= 204 and report["requests"] >= 140, report
    assert report["latency_us"]["p50"] >= 30_000  # never earlier than the delay
    assert report["latency_uncorrected_us"]["p50"] >= 30_000
    assert report["latency_from"] == "intended send time (corrected)"
    assert report["parameters"]["in_flight"] == 16


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_one_in_flight_behind_a_slow_server_is_held_and_corrected(start_server, env):
    """wrk2's case: one request in flight, a server slower than the schedule. The sends wait
    (held: the server's doing, not late: ours), and latency from the intended send time
    counts the wait the uncorrected figure hides (coordinated omission)."""
    target = delayed_server(start_server, "30ms")
    code, report, _ = bench(
        target, "--rate", "200", "-c", "2", "-d", "1", "-p", "1", "--in-flight", "1", env=env
    )
    assert code == 0, report
    assert report["held_sends"] > 0
    corrected, uncorrected = report["latency_us"], report["latency_uncorrected_us"]
    assert uncorrected["p50"] < 60_000  # each echo itself took about 30 ms
    assert corrected["p99"] > 2 * uncorrected["p99"], (corrected, uncorrected)


def counts(text: str) -> dict[int, int]:
    from socket_echo.tools.bench.histograms import decode, iterate

    return dict(iterate(decode(text, "test")))


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize("arrival", ["uniform", "poisson"])
def test_open_loop_figures_and_what_they_mean(shared_server, env, arrival):
    server = shared_server()
    code, report, table = bench(
        f"127.0.0.1:{server.port}", "--rate", "800", "-c", "4", "-d", "0.5", "-p", "1",
        "--arrival", arrival, env=env,
    )  # fmt: skip
    assert code == 0, report
    assert 300 <= report["sends"] <= 500 and report["parameters"]["arrival"] == arrival
    for p in ("p50", "p90", "p99", "p999", "p9999", "p99999", "max"):
        assert report["latency_us"][p] >= report["latency_uncorrected_us"][p]  # slot <= send
    lat = report["latency_us"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["p9999"] <= lat["max"]
    lateness = report["send_lateness_us"]  # how late sends left their slot: every send's
    assert 0 <= lateness["p50"] <= lateness["max"] < 1_000_000, lateness  # one per send
    assert sum(counts(report["histogram_lateness"]).values()) == report["sends"]
    assert report["latency_resolution_us"] == 1
    assert "from send" in table and "late" in table


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_the_warmup_is_left_out_of_every_figure(shared_server, env):
    server = shared_server()
    code, report, _ = bench(
        f"127.0.0.1:{server.port}", "--rate", "400", "-c", "2", "-d", "0.5", "--warmup", "0.5",
        "-p", "1", env=env,
    )  # fmt: skip
    assert code == 0, report
    assert report["sends"] <= 201 and report["requests"] <= 201  # 0.5 s of 400/s, not 1 s
    assert report["requests"] >= 150
    assert report["window"]["seconds"] == pytest.approx(0.5, abs=0.1)
    per_second = report["per_second"]
    assert sum(s["requests"] for s in per_second) == report["requests"]


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_pipelined_echoes_out_of_order_are_caught(env):
    server = Broken("reorder")
    try:
        code, report, _ = bench(
            f"127.0.0.1:{server.port}", "--rate", "2000", "-c", "1", "-s", "1000", "-d", "0.5",
            "-p", "1", "--timeout", "0.3", env=env,
        )  # fmt: skip
    finally:
        server.close()
    assert code == 1 and report["mismatches"] + report["errors"] > 0


def test_rate_is_refused_where_there_is_no_open_loop():
    result = tool("bench", "127.0.0.1:9", "--mode", "stream", "--rate", "10")  # before connecting
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        "socket-echo: error: --rate is the open loop of --mode pingpong, not of stream"
    ]


def test_plot_and_hgrm_from_one_run(shared_server, tmp_path):
    """--plot draws a PNG; --hgrm is HdrHistogram's percentile distribution of the same run."""
    server = shared_server()
    out, png = tmp_path / "run.hgrm", tmp_path / "latency.png"
    code, report, _ = bench(
        f"127.0.0.1:{server.port}", "-c", "2", "-d", "0.3", "-p", "1", "--hgrm", str(out),
        "--plot", str(png),
    )  # fmt: skip
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = out.read_text().splitlines()
    assert lines[0].split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    assert lines[-2].split("TotalCount")[1].strip(" =]") == f"{report['requests']}.000"
    assert float(lines[2].split()[0]) == report["latency_us"]["min"]


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_latency_under_load_is_a_flow_beside_the_stream(shared_server, env):
    """iperf2's --bounceback-congest: a 64 B ping-pong at a low rate on a connection of its
    own while the others saturate the path; its figures apart from the stream's."""
    server = shared_server()
    code, report, table = bench(
        f"127.0.0.1:{server.port}", "--mode", "stream", "-c", "2", "-d", "0.5", "-p", "1",
        "--probe-rate", "400", env=env,
    )  # fmt: skip
    assert code == 0, report
    flow = report["under_load"]
    assert flow["rate"] == 400 and flow["size"] == 64 and flow["mismatches"] == 0
    assert 150 <= flow["requests"] <= 201, flow
    assert flow["latency_us"]["p50"] >= flow["latency_uncorrected_us"]["p50"]
    assert report["megabytes_per_second"] > 0 and report["parameters"]["connections"] == 2
    assert "under load" in table
    refused = tool("bench", f"127.0.0.1:{server.port}", "--probe-rate", "10")
    assert refused.returncode == 2 and b"--mode stream" in refused.stderr


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
@pytest.mark.parametrize("mode", ["pingpong", "stream", "churn"])
def test_bench_ends_every_connection_with_fin_never_a_reset(env, mode):
    """A reset wedges a firmware loop like the seed's for good (it takes recv() == -1 for
    data). bench ended runs with one in 3 of 12 runs against the seed over lwIP: it closed
    with echo in flight. Now it half-closes, reads what is owed until the peer closes, and
    the peer sees a FIN, every run (two a case), in every mode, C loop or twin."""
    server = Broken("witness")
    try:
        for _ in range(2):
            code, report, _ = bench(
                f"127.0.0.1:{server.port}", "--mode", mode, "-c", "1", "-d", "0.1",
                "-s", "1024" if mode != "stream" else "65536", env=env,
            )  # fmt: skip
            assert code == 0, report
            assert report["resets_sent"] == 0 and report["ended_gracefully"] >= 1, report
            ended = server.lines(1)  # churn's many connections: each says, the first here
            assert ended == ["END fin"], ended
    finally:
        server.close()


def test_a_peer_that_never_closes_is_reset_after_the_drain_timeout_and_said():
    """The one case for a reset: the peer neither answers nor closes after bench's FIN.
    Counted, warned about, and the run takes the drain timeout, not for ever."""
    import time

    server = Broken("deaf")
    try:
        started = time.monotonic()
        _, report, table = bench(
            f"127.0.0.1:{server.port}", "-c", "2", "-d", "0.3", "--timeout", "0.5",
            "--drain-timeout", "0.5",
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        server.close()
    assert report["resets_sent"] == 2 and report["ended_gracefully"] == 0, report
    assert report["parameters"]["drain_timeout"] == 0.5
    assert "2 connection(s) ended with a reset" in table
    assert took < 8, took


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_a_one_client_at_a_time_peer_is_named_not_called_healthy(env):
    """bench -c 5 against the seed's loop reported 10,185 req/s, errors 0, exit 0: four
    connections waited the whole run, left out of every figure. Now each connection's share
    is counted, the waiting ones are errors, and the text says what it likely means."""
    server = Broken("seed")
    try:
        code, report, table = bench(f"127.0.0.1:{server.port}", "-c", "5", "-d", "0.3", env=env)
    finally:
        server.close()
    assert code == 1, report  # not healthy
    pc = report["per_connection"]
    assert pc["connections"] == 5 and pc["never_answered"] == 4, pc
    assert sorted(pc["answers"])[:4] == [0, 0, 0, 0] and pc["max"] == report["requests"] > 0
    assert pc["fairness"] == pytest.approx(0.2)
    assert sorted(pc["first_answer_s"])[:4] == [-1, -1, -1, -1]
    assert report["error_kinds"] == {"connection never answered": 4}
    assert "4 of 5 connections never got an answer" in table
    assert "serves 1 client(s) at a time" in table


@pytest.mark.parametrize("env", LOOPS, ids=LOOP_IDS)
def test_the_transport_is_read_from_the_kernel(shared_server, env):
    """Retransmissions and the kernel's RTT came only from packet captures; bench reads them
    from TCP_INFO on its own sockets: one RTT per connection, none retransmitted on loopback."""
    server = shared_server()
    code, report, table = bench(f"127.0.0.1:{server.port}", "-c", "3", "-d", "0.3", env=env)
    assert code == 0, report
    t = report["transport"]
    assert t["connections_sampled"] == 3 and len(t["kernel_rtt_us"]) == 3, t
    assert t["retransmitted_segments"] == 0 and t["retransmitted_per_mb"] == 0
    assert 0 < t["kernel_rtt_p50_us"] <= t["kernel_rtt_max_us"] < 1_000_000
    assert "segment(s) retransmitted" in table and "kernel RTT p50" in table
