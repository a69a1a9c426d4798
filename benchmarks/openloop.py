"""bench as an instrument: its open loop against the C epoll echo, paired with the closed loop.

The C echo (benchmarks/c/echo_epoll.c) runs fresh for every measurement on CPU 0, bench on
CPU 1 (``-p 1``). Per run: the closed-loop one-connection round trip (the truth the open
loop must not inflate), then 5 connections at 500, 10,000 and 50,000 req/s; medians over
``--runs``. Then a sweep for the highest rate one bench process holds with late_sends under
0.1 %, and the time ``socket-echo report`` takes to add 100 one-second results.

    python benchmarks/openloop.py [--runs 5] [--duration 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import BUILD, LOAD_CPU, RESULTS, Server, compile_c, cpu_model, pinned

RATES = (500, 10_000, 50_000)
SWEEP = (500, 2_000, 5_000, 10_000, 20_000, 40_000, 60_000, 80_000, 100_000)


def bench(port: int, secs: float, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "socket_echo", "bench", f"127.0.0.1:{port}", "-p", "1",
           "-d", str(secs), "--json", "-", *args]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=secs + 60, preexec_fn=pinned(LOAD_CPU)
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def reference() -> list[str]:
    return [str(BUILD / "echo_epoll"), "{port}"]


def one_run(secs: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    server = Server(reference())
    try:
        closed = bench(server.port, secs, "-c", "1")
        out["closed"] = {"p50": closed["latency_us"]["p50"], "p99": closed["latency_us"]["p99"]}
        for rate in RATES:
            r = bench(server.port, secs, "-c", "5", "--rate", str(rate))
            out[rate] = {
                "p50": r["latency_us"]["p50"],
                "p99": r["latency_us"]["p99"],
                "p50_send": r["latency_uncorrected_us"]["p50"],
                "p99_send": r["latency_uncorrected_us"]["p99"],
                "late": r["late_sends"] / max(1, r["sends"]),
                "lateness_p99": r["send_lateness_us"]["p99"],
                "rps": r["requests_per_second"],
            }
    finally:
        server.stop()
    return out


def sweep(secs: float) -> list[tuple[int, float, float]]:
    rows = []
    server = Server(reference())
    try:
        for rate in SWEEP:
            r = bench(server.port, secs, "-c", "5", "--rate", str(rate))
            rows.append((rate, r["late_sends"] / max(1, r["sends"]), r["requests_per_second"]))
    finally:
        server.stop()
    return rows


def merge_time() -> float:
    """report over 100 one-second results (one real result, as 100 segments)."""
    tmp = Path(tempfile.mkdtemp())
    try:
        server = Server(reference())
        try:
            one = bench(server.port, 1.0, "-c", "5", "--rate", "10000")
        finally:
            server.stop()
        files = []
        for i in range(100):
            one["segment"] = {"index": i, "count": 100}
            one["parameters"]["segment"] = f"{i}/100"
            path = tmp / f"s{i}.json"
            path.write_text(json.dumps(one))
            files.append(str(path))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "socket_echo", "report", *files, "--json",
                        str(tmp / "merged.json")], check=True, capture_output=True)  # fmt: skip
        return time.perf_counter() - started
    finally:
        shutil.rmtree(tmp)


def med(runs: list[dict[str, Any]], key: Any, field: str) -> float:
    return statistics.median(r[key][field] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0)
    args = ap.parse_args()
    compile_c()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.duration))
        print(f"run {i + 1}/{args.runs}: {runs[-1]}", file=sys.stderr, flush=True)
    closed50, closed99 = med(runs, "closed", "p50"), med(runs, "closed", "p99")
    lines = [
        f"bench's open loop against the C epoll echo ({cpu_model()}; server on CPU 0, bench -p 1 "
        f"on CPU 1; medians of {args.runs} runs of {args.duration:g} s)",
        "",
        f"Closed loop, 1 connection: p50 {closed50:.0f} µs, p99 {closed99:.0f} µs.",
        "",
        "| 5 connections at | req/s | p50 from slot | p50 from send | p99 from slot | "
        "p99 from send | late sends | p99 send lateness |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in RATES:
        lines.append(
            f"| {rate:,} req/s | {med(runs, rate, 'rps'):,.0f} | {med(runs, rate, 'p50'):.0f} µs | "
            f"{med(runs, rate, 'p50_send'):.0f} µs | {med(runs, rate, 'p99'):.0f} µs | "
            f"{med(runs, rate, 'p99_send'):.0f} µs | {100 * med(runs, rate, 'late'):.2f} % | "
            f"{med(runs, rate, 'lateness_p99'):.0f} µs |"
        )
    p50, p99 = med(runs, 500, "p50"), med(runs, 500, "p99")
    ok50, ok99 = p50 <= 1.5 * closed50 + 20, p99 <= 3 * closed99 + 50
    lines += [
        "",
        f"Target at 500 req/s: p50 {p50:.0f} µs ≤ 1.5 x {closed50:.0f} + 20 = "
        f"{1.5 * closed50 + 20:.0f} µs {'✅' if ok50 else '❌'}; p99 {p99:.0f} µs ≤ 3 x "
        f"{closed99:.0f} + 50 = {3 * closed99 + 50:.0f} µs {'✅' if ok99 else '❌'}",
    ]
    rows = sweep(args.duration)
    held = [rate for rate, late, _ in rows if late < 0.001]
    lines += [
        "",
        "Sweep, one bench process, 5 connections: "
        + ", ".join(f"{rate:,}/s: {100 * late:.2f} % late" for rate, late, _ in rows),
        f"Highest rate with late_sends under 0.1 %: {max(held):,}/s" if held else
        "No rate held late_sends under 0.1 % (the machine's scheduling noise: see lateness)",
    ]  # fmt: skip
    seconds = merge_time()
    lines += ["", f"report over 100 one-second results: {seconds:.2f} s (target < 1 s) "
              f"{'✅' if seconds < 1 else '❌'}"]  # fmt: skip
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "openloop.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
