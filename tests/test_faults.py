"""Faults on the path (tests/fault_proxy.py between client and server): the echo stays
byte-exact, or the fault is reported, never silent corruption; probe and bench say what
happened."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

import pytest
from conftest import exchange
from fault_proxy import TcpFaultProxy, UdpFaultProxy
from tools_helpers import tool

BLOB = os.urandom(256 * 1024)


def bench_json(stdout: bytes) -> dict:  # type: ignore[type-arg]
    """bench --json -: stdout is the JSON alone (the table goes to stderr)."""
    return json.loads(stdout)


def through(proxy: TcpFaultProxy, data: bytes = BLOB) -> bytes:
    with socket.create_connection(proxy.address, timeout=20) as sock:
        return exchange(sock, data)


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param({"latency": 0.02, "jitter": 0.03}, id="latency-jitter"),
        pytest.param({"bandwidth": 2_000_000}, id="bandwidth-2MBps"),
        pytest.param({"slice_min": 1, "slice_max": 7, "slice_delay": 0.0005}, id="slices-1-7B"),
        pytest.param({"slice_min": 1, "slice_max": 3000}, id="slices-1-3000B"),
    ],
)
def test_echo_is_byte_exact_through_each_fault(shared_server, server_flags, faults):
    server = shared_server(*server_flags)
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(**faults)
        proxy.downstream_faults.set(**faults)
        data = BLOB if "slice_delay" not in faults else BLOB[: 16 * 1024]
        assert through(proxy, data) == data


def test_bandwidth_cap_is_real():
    """The proxy's cap holds (else the test above proves nothing about slow paths)."""
    sink = socket.create_server(("127.0.0.1", 0))
    with sink, TcpFaultProxy(sink.getsockname()[:2]) as proxy:
        proxy.upstream_faults.set(bandwidth=200_000)
        started = time.monotonic()
        with socket.create_connection(proxy.address) as c:
            conn, _ = sink.accept()
            c.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(conn.recv(65536))
            conn.close()
        assert time.monotonic() - started >= 0.45


def test_stalled_direction_resumes_without_loss(start_server, server_flags):
    """The echo direction stalls for a second: the server's send buffer fills, it stops
    reading (flow control), and when the path clears every byte arrives in order."""
    server = start_server(*server_flags, "--max-buffer", "64KiB")
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.downstream_faults.set(stalled=True)
        threading.Timer(1.0, proxy.downstream_faults.set, kwargs={"stalled": False}).start()
        data = os.urandom(4 * 1024 * 1024)
        assert through(proxy, data) == data


def test_half_close_at_a_chosen_byte_returns_exactly_that_prefix(shared_server, server_flags):
    server = shared_server(*server_flags)
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(half_close_at=100_001)
        with socket.create_connection(proxy.address, timeout=10) as sock:
            sock.sendall(BLOB)
            got = bytearray()
            while chunk := sock.recv(65536):
                got += chunk
        assert bytes(got) == BLOB[:100_001]  # all of it, nothing more, then EOF


def test_reset_at_a_chosen_byte_is_reported_not_corrupted(shared_server, server_flags):
    server = shared_server(*server_flags)
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(reset_at=50_000)
        sock = socket.create_connection(proxy.address, timeout=10)

        def send() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(BLOB)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        with sock, pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
            raise AssertionError(f"the reset was not reported: clean EOF after {len(got)} B")
        sender.join(10)
        assert len(got) <= 50_000
        assert bytes(got) == BLOB[: len(got)]  # a prefix: never a wrong byte
    # The server goes on serving everyone else.
    with server.connect() as c:
        assert exchange(c, b"after the reset") == b"after the reset"


def test_client_tool_reports_a_reset_in_one_line(start_server, tmp_path):
    server = start_server()
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(reset_at=20_000)
        data = tmp_path / "data"
        data.write_bytes(BLOB)
        result = tool("client", f"127.0.0.1:{proxy.port}", stdin=data.read_bytes())
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "reset" in err.lower(), err
    assert BLOB.startswith(result.stdout)


def test_probe_passes_over_a_slow_sliced_path_and_fails_over_a_resetting_one(start_server):
    server = start_server()
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(latency=0.005, slice_min=1, slice_max=1500)
        proxy.downstream_faults.set(latency=0.005, jitter=0.005)
        result = tool("probe", "--json", f"127.0.0.1:{proxy.port}")
        assert result.returncode == 0, result.stdout
        report = json.loads(result.stdout)
        latency = next(s for s in report["steps"] if s["name"].startswith("latency"))
        assert latency["p50_us"] >= 10_000  # the path's 2 x 5 ms, measured
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(reset_at=5000)
        result = tool("probe", "--json", f"127.0.0.1:{proxy.port}")
        assert result.returncode == 1
        report = json.loads(result.stdout)
        failed = [s for s in report["steps"] if s["status"] == "fail"]
        assert failed and any("reset" in s["detail"].lower() for s in failed), failed


def test_bench_sees_the_path_latency_and_counts_resets_as_errors(start_server):
    server = start_server()
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(latency=0.01)
        result = tool(
            "bench", f"127.0.0.1:{proxy.port}", "-c", "4", "-d", "0.4", "-p", "1", "--json", "-"
        )
        assert result.returncode == 0, result.stdout
        summary = bench_json(result.stdout)
        assert summary["mismatches"] == 0 and summary["requests"] > 0
        assert summary["latency_us"]["p50"] >= 10_000
    with TcpFaultProxy((server.host, server.port)) as proxy:
        proxy.upstream_faults.set(reset_at=64 * 50)  # every connection dies after 50 requests
        result = tool(
            "bench", f"127.0.0.1:{proxy.port}", "-c", "2", "-d", "0.4", "-p", "1", "--json", "-"
        )
        summary = bench_json(result.stdout)
        assert summary["mismatches"] == 0
        assert summary["errors"] > 0, summary
        assert result.returncode == 1


def test_udp_probe_passes_through_duplication_and_names_it(start_server):
    server = start_server("--udp-rate", "100000", "--udp-burst", "100000")
    _, host, port = server.listener("udp")
    with UdpFaultProxy((host, port), duplicate=0.5, seed=3) as proxy:
        result = tool("probe", "--json", f"udp://127.0.0.1:{proxy.address[1]}")
        assert proxy.counts["duplicated"] > 0
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert any("late or duplicate" in f for f in report["findings"]), report


def test_udp_through_loss_duplication_and_reordering(start_server):
    """Probe and bench tell losses and stale answers from wrong bytes: nothing is called
    corrupt that was not, and the losses and duplicates are counted."""
    server = start_server("--udp-rate", "100000", "--udp-burst", "100000")
    _, host, port = server.listener("udp")
    with UdpFaultProxy((host, port), drop=0.2, duplicate=0.2, reorder=0.2, seed=7) as proxy:
        target = f"udp://127.0.0.1:{proxy.address[1]}"
        result = tool("probe", "--json", "--timeout", "1.5", target)
        report = json.loads(result.stdout)
        for step in report["steps"]:
            assert "differs" not in step["detail"], step
            if step["status"] == "fail":
                assert step["detail"].startswith("no reply"), step
        result = tool("bench", target, "-c", "4", "-d", "1", "-p", "1", "--json", "-")
        summary = bench_json(result.stdout)
        assert summary["mismatches"] == 0
        assert summary["lost_datagrams"] > 0
        assert summary["duplicate_datagrams"] + summary["late_datagrams"] > 0
        assert proxy.counts["dropped"] > 0 and proxy.counts["duplicated"] > 0


def test_quic_and_dtls_deliver_byte_exact_through_loss_duplication_and_reordering(
    start_server,
):
    """QUIC retransmits and reorders streams itself; DTLS retransmits its handshake, drops
    replayed records, and the client resends a record whose echo was lost. Through a path that
    drops, duplicates and reorders both ways, every byte that comes back is right."""
    import asyncio
    import random

    from aioquic.asyncio.client import connect
    from conftest import metrics_port, scrape, total

    from socket_echo.tools.connect.quic import QuicClient, configuration
    from socket_echo.tools.connect.target import Target, TlsOptions

    server = start_server(
        "--bind", "quic://127.0.0.1:0", "--bind", "dtls://127.0.0.1:0", "--tls-self-signed",
        "--metrics", "127.0.0.1:0", "--tls-handshake-timeout", "30",
    )  # fmt: skip
    _, host, quic_port = server.listener("quic")
    _, _, dtls_port = server.listener("dtls")
    faults = {"drop": 0.1, "duplicate": 0.2, "reorder": 0.2}
    with UdpFaultProxy((host, quic_port), seed=11, **faults) as proxy:
        target = Target("quic", "127.0.0.1", proxy.address[1])
        config = configuration("echo-quic", TlsOptions(insecure=True), target.host)
        data = random.Random(5).randbytes(60_000)

        async def quic() -> tuple[bytes, bytes]:
            async with connect(
                target.host, target.port, configuration=config, create_protocol=QuicClient
            ) as client:
                assert isinstance(client, QuicClient)
                client.send(0, data, end=True)
                client.send(4, b"a second stream", end=True)
                await client.until(lambda: {0, 4} <= client.ended, 30, "QUIC echo")
                return bytes(client.got[0]), bytes(client.got[4])

        assert asyncio.run(asyncio.wait_for(quic(), 60)) == (data, b"a second stream")
        assert proxy.counts["dropped"] and proxy.counts["duplicated"] and proxy.counts["reordered"]
    with UdpFaultProxy((host, dtls_port), seed=12, **faults) as proxy:
        url = f"dtls://127.0.0.1:{proxy.address[1]}"
        # a lock-step handshake through this path may wait out several doubling timers
        result = tool("probe", url, "--insecure", "--json", "--timeout", "30")
        report = json.loads(result.stdout)
        assert result.returncode == 0, report
        assert not any("differ" in s["detail"] for s in report["steps"])
        assert proxy.counts["dropped"] and proxy.counts["duplicated"]
    m = scrape(metrics_port(server))
    assert total(m, "socket_echo_connections_opened_total") >= 3  # QUIC 1, DTLS 2 (probe)
