"""--rate over quic:// and dtls://: the open loop in bench's asyncio workers, each message timed
from its slot, its coarser grain said (a send is late past 1 ms there, not 10 µs)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def secure_server():  # type: ignore[no-untyped-def]
    from conftest import ServerProcess

    server = ServerProcess(["--bind", "quic://127.0.0.1:0", "--bind", "dtls://127.0.0.1:0",
                            "--tls-self-signed"], expect_listeners=2)  # fmt: skip
    yield server
    server.kill()


@pytest.mark.parametrize("scheme", ["quic", "dtls"])
def test_the_open_loop_keeps_its_schedule_over_quic_and_dtls(secure_server, scheme):
    _, host, port = secure_server.listener(scheme)
    done = run_cli("bench", f"{scheme}://{host}:{port}", "--insecure", "--rate", "400", "-c", "2",
                   "-d", "0.5", "-p", "1", "--json", "-")  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout[done.stdout.index("{") :])
    assert r["latency_from"] == "intended send time (corrected)"
    assert 150 <= r["sends"] <= 205, r["sends"]  # 400/s for 0.5 s
    assert r["errors"] == 0 and r["mismatches"] == 0 and r["requests"] >= r["sends"] - 4, r
    assert r["late_send_threshold_us"] == 1000  # asyncio's grain, said in the output
    assert r["latency_uncorrected_us"]["p50"] is not None
    assert "over 1000 µs" in done.stderr
