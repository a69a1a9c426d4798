"""QUIC and DTLS, informative: what the quic:// and dtls:// listeners cost.

QUIC: handshakes/s (``bench --mode churn``: handshake, one 64 B echo, close) and bulk MB/s on
one stream (``bench --mode stream -c 1``, 64 KiB writes) against a bare aioquic echo
(quic_echo_bare.py, net-tools' quic-echo-server.py idea). DTLS: handshakes/s (churn) and
records/s (50 sessions x 64 B ping-pong) of socket-echo's dtls://; no C DTLS echo exists to
compare with (``openssl s_server -dtls`` serves one peer and does not echo).

Servers on CPU 0, ``socket-echo bench -p 1`` on CPU 1, fresh server per run, medians of
``--runs``; the server's CPU share says which side bounds the figure (both are Python), and
"per server core" (the figure divided by that share) is what one core of server would carry.

    python benchmarks/secure.py [--runs 3] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LOAD_CPU, RESULTS, Server, pinned, socket_echo

HERE = Path(__file__).resolve().parent
UNLIMITED = ["--udp-rate", "1e9", "--udp-burst", "1000000000", "--udp-max-rate", "1e9"]


def bound(port: int) -> bool:
    """Has a server bound this UDP port yet?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def bench(url: str, mode: str, conns: int, size: int, secs: float) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "socket_echo", "bench", url, "--insecure", "--mode", mode,
        "-c", str(conns), "-s", str(size), "-d", str(secs), "-p", "1", "--json", "-",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=secs + 120, preexec_fn=pinned(LOAD_CPU)
    )
    text = done.stdout
    result: dict[str, Any] = json.loads(text[text.index("\n{") :])
    return result


def measure(
    argv: list[str], scheme: str, mode: str, conns: int, size: int, secs: float
) -> dict[str, Any]:
    server = Server(argv, ready=bound)
    try:
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        r = bench(f"{scheme}://127.0.0.1:{server.port}", mode, conns, size, secs)
        r["server_cpu_share"] = (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    finally:
        server.stop()
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    from trustme import CA

    tmp = tempfile.mkdtemp()
    cert = CA().issue_cert("localhost", "127.0.0.1")
    pem = os.path.join(tmp, "server.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(pem)
    creds = ["--tls-cert", pem, "--tls-key", pem]
    se = socket_echo(sys.executable, *creds, *UNLIMITED, "--metrics", "127.0.0.1:0")
    quic_servers = {
        "bare aioquic echo (reference)": [
            sys.executable, str(HERE / "quic_echo_bare.py"), "{port}", pem, pem,
        ],
        "socket-echo quic://": [*se, "--bind", "quic://127.0.0.1:{port}"],
    }  # fmt: skip
    dtls = [*se, "--bind", "dtls://127.0.0.1:{port}"]
    cases = [  # (figure, scheme, servers, mode, connections, size, key)
        ("QUIC handshakes/s", "quic", quic_servers, "churn", 4, 64, "requests_per_second"),
        ("QUIC bulk MB/s, 1 stream", "quic", quic_servers, "stream", 1, 65536,
         "megabytes_per_second"),
        ("DTLS handshakes/s", "dtls", {"socket-echo dtls://": dtls}, "churn", 8, 64,
         "requests_per_second"),
        ("DTLS records/s, 50 x 64 B", "dtls", {"socket-echo dtls://": dtls}, "pingpong", 50, 64,
         "requests_per_second"),
    ]  # fmt: skip
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    lines = [
        "| figure | server | median | server CPU share | per server core | errors + mismatches |",
        "|---|---|---|---|---|---|",
    ]
    for figure, scheme, table, mode, conns, size, key in cases:
        results[figure] = {name: [] for name in table}
        for run in range(args.runs):
            for name, argv in table.items():
                r = measure(argv, scheme, mode, conns, size, args.duration)
                results[figure][name].append(r)
                print(f"[{figure}] run {run + 1} {name}: {r[key]:.1f}", file=sys.stderr)
        for name, runs in results[figure].items():
            value = statistics.median(r[key] for r in runs)
            share = statistics.median(r["server_cpu_share"] for r in runs)
            bad = sum(r["errors"] + r["mismatches"] for r in runs)
            per_core = statistics.median(r[key] / r["server_cpu_share"] for r in runs)
            lines.append(
                f"| {figure} | {name} | {value:,.1f} | {share:.0%} | {per_core:,.0f} | {bad} |"
            )
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secure.json").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / "secure.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
