"""TLS under bench's load, paired in one run: socket-echo's tls:// listener against a C TLS echo
(benchmarks/c/echo_tls.c: epoll and non-blocking OpenSSL), each loaded by ``socket-echo bench``
over tls:// (its C loop with OpenSSL for the ping-pong; the Python loop for stream and churn).

Per mode: 64 B ping-pong (50 connections: requests/s, server and client CPU per request),
stream (1 connection, 64 KiB writes: MB/s, server CPU per MB) and churn (50 at once, a full
handshake each: handshakes/s, server CPU per handshake). Servers on CPU 0, bench on CPU 1,
runs interleaved, medians of per-run paired ratios. The load-side check: bench's client CPU per
TLS request against the C reference's server CPU per request (target <= 1.1x: the load
generator costs no more than the server it measures).

    python benchmarks/tls_load.py [--runs 3] [--duration 3]     (run.py --only tls runs it too)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BUILD, HERE, LOAD_CPU, Server, fmt, machine, pinned, socket_echo

REFERENCE = "C TLS echo (reference)"
MODES = {  # mode: (connections, size, figure, unit)
    "pingpong": (50, 64, "requests_per_second", "req/s"),
    "stream": (1, 65536, "megabytes_per_second", "MB/s"),
    "churn": (50, 64, "requests_per_second", "handshakes/s"),
}


def compile_tls() -> Path | None:
    """The C TLS echo, or None where OpenSSL's headers are missing (said in the report)."""
    BUILD.mkdir(exist_ok=True)
    src, exe = HERE / "c" / "echo_tls.c", BUILD / "echo_tls"
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    done = subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(src), "-lssl", "-lcrypto"],
                          capture_output=True, text=True)  # fmt: skip
    return exe if done.returncode == 0 else None


def credentials(folder: Path) -> dict[str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {k: str(folder / f"{k}.pem") for k in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.private_key_pem.write_to_path(files["key"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    return files


def bench(port: int, ca: str, mode: str, seconds: float) -> dict[str, Any]:
    conns, size, _, _ = MODES[mode]
    cmd = [sys.executable, "-m", "socket_echo", "bench", f"tls://127.0.0.1:{port}", "--ca", ca,
           "--mode", mode, "-c", str(conns), "-s", str(size), "-d", str(seconds), "-p", "1",
           "--json", "-"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                          preexec_fn=pinned(LOAD_CPU))  # fmt: skip
    out = done.stdout
    return dict(json.loads(out[out.index("{") :]))


def run_tls(seconds: float, runs: int) -> dict[str, Any]:
    exe = compile_tls()
    folder = Path(tempfile.mkdtemp(prefix="se-tls-"))
    pem = credentials(folder)
    table = {
        "socket-echo tls:// (uvloop)": socket_echo(
            sys.executable,
            "--loop",
            "uvloop",
            "--metrics",
            "127.0.0.1:0",
            "--bind",
            "tls://127.0.0.1:{port}",
            "--tls-cert",
            pem["cert"],
            "--tls-key",
            pem["key"],
        ),
    }
    if exe is not None:
        table = {REFERENCE: [str(exe), "{port}", pem["cert"], pem["key"]], **table}
    out: dict[str, Any] = {"reference_built": exe is not None, "modes": {}, "runs": runs,
                           "seconds": seconds}  # fmt: skip
    for mode in MODES:
        per: dict[str, list[dict[str, Any]]] = {name: [] for name in table}
        for run in range(runs):
            for name, argv in table.items():
                server = Server(argv)
                try:
                    cpu0 = server.cpu_seconds()
                    r = bench(server.port, pem["ca"], mode, seconds)
                    r["server_cpu_s"] = server.cpu_seconds() - cpu0
                finally:
                    server.stop()
                done = r["requests"] if mode != "stream" else r["megabytes_per_second"] * seconds
                r["server_cpu_per_unit_us"] = r["server_cpu_s"] / max(done, 1e-9) * 1e6
                client_s = r["client_cpu_percent"] / 100 * r["window"]["seconds"]
                r["client_cpu_per_unit_us"] = client_s / max(done, 1e-9) * 1e6
                per[name].append(r)
                print(f"[tls {mode}] run {run + 1}/{runs} {name}: "
                      f"{r[MODES[mode][2]]:,.1f} {MODES[mode][3]}, server "
                      f"{r['server_cpu_per_unit_us']:.2f} µs CPU/unit, errors {r['errors']}",
                      file=sys.stderr, flush=True)  # fmt: skip
        out["modes"][mode] = per
    return out


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=False) if y[key]]
    return statistics.median(ratios) if ratios else None


def tls_report(res: dict[str, Any]) -> str:
    lines = ["", "### TLS under bench's load (socket-echo bench over tls://)", "",
             machine(res["runs"], res["seconds"]), ""]  # fmt: skip
    if not res["reference_built"]:
        lines += ["(the C TLS echo was not built: OpenSSL's headers are missing)", ""]
    lines += ["| mode | server | throughput | server CPU µs per unit | bench CPU µs per unit | "
              "errors |", "|---|---|---|---|---|---|"]  # fmt: skip
    for mode, per in res["modes"].items():
        _, _, key, unit = MODES[mode]
        for name, rs in per.items():
            lines.append(
                f"| {mode} | {name} | {fmt(statistics.median(r[key] for r in rs))} {unit} | "
                f"{statistics.median(r['server_cpu_per_unit_us'] for r in rs):.2f} | "
                f"{statistics.median(r['client_cpu_per_unit_us'] for r in rs):.2f} | "
                f"{sum(r['errors'] + r['mismatches'] for r in rs)} |"
            )
    se = "socket-echo tls:// (uvloop)"
    if res["reference_built"]:
        lines += ["", "Paired ratios, socket-echo / the C TLS echo (medians of per-run ratios):"]
        lines += [""]
        for mode, per in res["modes"].items():
            key, unit = MODES[mode][2], MODES[mode][3]
            t = paired(per[se], per[REFERENCE], key)
            c = paired(per[se], per[REFERENCE], "server_cpu_per_unit_us")
            lines.append(f"- {mode}: {unit} {t:.2f}x, server CPU per unit {c:.2f}x"
                         if t and c else f"- {mode}: —")  # fmt: skip
        ref = res["modes"]["pingpong"][REFERENCE]
        ratios = [r["client_cpu_per_unit_us"] / r["server_cpu_per_unit_us"] for r in ref
                  if r["server_cpu_per_unit_us"]]  # fmt: skip
        if ratios:
            lines += ["", "Load-side check (ping-pong against the C TLS echo): bench's CPU per "
                      f"request / the server's = {statistics.median(ratios):.2f}x "
                      "(target <= 1.1x)"]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    args = ap.parse_args()
    res = run_tls(args.duration, args.runs)
    print(tls_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
