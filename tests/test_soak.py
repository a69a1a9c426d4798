"""The soak (tests/soak.py): a 3-second run in every `make test`; `make soak` (60 s by
default, DURATION=1800 for a long one) runs the same code for longer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import unmeasured
from soak import BOUNDS, Soak

HERE = Path(__file__).resolve().parent


def test_soak_3_seconds_of_mixed_traffic(tmp_path, figure):
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(HERE / "soak.py"), "--duration", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=unmeasured(),  # its code paths are covered by the tests it only repeats
    )
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(out.read_text())
    assert report["passed"] and not report["problems"]
    # growth was judged, on enough samples after the warm-up (not skipped for being short)
    assert set(report["growth_after_warm_up"]) == set(BOUNDS)
    assert report["samples"] >= 12
    ops = report["operations"]
    figure(
        f"3 s soak: {ops.get('pingpong', 0)} ping-pongs, {ops.get('stream MiB', 0)} MiB streamed, "
        f"{ops.get('churn', 0)} churned connections, {ops.get('udp', 0)} datagrams, "
        f"{ops.get('tls sessions', 0)} TLS sessions, {ops.get('quic streams', 0)} QUIC streams, "
        f"{ops.get('dtls records', 0)} DTLS records; growth after warm-up "
        f"{report['growth_after_warm_up']}; 0 bytes wrong"
    )


def test_the_verdict_catches_growth_and_stalls():
    """The checker itself: a leak in the samples, or a traffic kind that did nothing, fails."""
    soak = Soak(60)
    soak.samples = [
        {"t": float(t), "rss_mib": 40 + t * 0.5, "fds": 20, "tasks": 2, "connections": 10}
        for t in range(0, 61, 2)
    ]
    soak.counts.update({"pingpong": 1, "stream MiB": 1, "churn": 1, "udp": 1})
    verdict = soak.verdict()
    assert not verdict["passed"]
    assert any("rss_mib grew" in p for p in verdict["problems"])
    assert any("no tls sessions" in p for p in verdict["problems"])
    assert verdict["growth_after_warm_up"]["rss_mib"] > BOUNDS["rss_mib"]
