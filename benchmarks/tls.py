"""TLS, informative: socket-echo's tls:// listener against ``socat OPENSSL-LISTEN ... PIPE``.

Handshakes/s with ``openssl s_time -new`` (a full handshake per connection, no data) and bulk
MB/s through one connection (64 MiB, ``socket-echo client`` as the client for both). Servers on
CPU 0, clients on CPU 1, medians of ``--runs``. socat and openssl come from the system; a
missing one is skipped with a note.

    python benchmarks/tls.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LOAD_CPU, SERVER_CPU, Server, pinned, socket_echo


def handshakes_per_second(port: int, seconds: int) -> float:
    out = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds)],
        capture_output=True,
        text=True,
        preexec_fn=pinned(LOAD_CPU),
        timeout=seconds + 30,
    ).stdout
    m = re.search(r"(\d+) connections in (\d+) real seconds", out)
    return int(m.group(1)) / int(m.group(2)) if m else 0.0


def bulk_mb_per_second(port: int, payload: Path) -> float:
    started = time.perf_counter()
    with payload.open("rb") as src:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "socket_echo",
                "client",
                f"tls://127.0.0.1:{port}",
                "--insecure",
            ],
            stdin=src,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=pinned(LOAD_CPU),
            timeout=300,
        )
    if done.returncode:
        raise RuntimeError(done.stderr.decode())
    return payload.stat().st_size / (time.perf_counter() - started) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()
    if not shutil.which("openssl"):
        print("openssl not installed: nothing to measure handshakes with")
        return 0
    import trustme

    tmp = Path(tempfile.mkdtemp())
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    payload = tmp / "payload.bin"
    payload.write_bytes(os.urandom(64 << 20))
    servers = {
        "socket-echo (uvloop)": socket_echo(
            sys.executable,
            "--bind",
            "tls://127.0.0.1:{port}",
            "--tls-cert",
            str(tmp / "cert.pem"),
            "--tls-key",
            str(tmp / "key.pem"),
        ),
    }
    if shutil.which("socat"):
        servers["socat OPENSSL-LISTEN fork PIPE"] = [
            "socat",
            f"OPENSSL-LISTEN:{{port}},bind=127.0.0.1,reuseaddr,fork,"
            f"cert={tmp / 'cert.pem'},key={tmp / 'key.pem'},verify=0",
            "PIPE",
        ]
    else:
        print("socat not installed (apt-get install socat): measuring socket-echo only")
    results: dict[str, dict[str, list[float]]] = {n: {"hs": [], "mb": []} for n in servers}
    for _ in range(args.runs):
        for name, argv in servers.items():
            server = Server(argv)  # the runner's: pinned to the server CPU, waits for it
            try:
                results[name]["hs"].append(handshakes_per_second(server.port, args.seconds))
                results[name]["mb"].append(bulk_mb_per_second(server.port, payload))
            finally:
                server.stop()
    print(
        f"\nTLS, medians of {args.runs} runs (server on CPU {SERVER_CPU}, client on CPU "
        f"{LOAD_CPU}):\n"
    )
    print("| server | handshakes/s (openssl s_time -new) | bulk MB/s, 1 connection |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {statistics.median(r['hs']):,.0f} | {statistics.median(r['mb']):,.1f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
