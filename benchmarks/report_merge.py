"""``socket-echo report`` over long results: its time and peak memory when adding N results of
an hour each (3,600 per-second histograms per file, every one different), and the claims a
small file can make that once cost gigabytes (a segment count of 10^8).

    python benchmarks/report_merge.py [--files 4] [--seconds 3600]

Prints one line per case: wall seconds and the report process's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

FORMAT = "socket-echo bench 2"


def second_histograms(count: int, seed: int) -> list[str]:
    """``count`` distinct encoded histograms of a few thousand values each."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        hist = HdrHistogram(1, 3_600_000_000, 3)
        for _ in range(200):
            hist.record_value(int(rng.lognormvariate(4.5, 0.6)) + 1, rng.randint(1, 50))
        out.append(hist.encode().decode("ascii"))
    return out


def result(index: int, files: int, seconds: int, start: float) -> dict[str, Any]:
    per_second = second_histograms(seconds, index)
    whole = HdrHistogram(1, 3_600_000_000, 3)
    for text in per_second[:50]:
        whole.decode_and_add(text)
    return {
        "format": FORMAT, "target": "tcp://127.0.0.1:4242", "mode": "pingpong",
        "requests": 1000 * seconds, "requests_per_second": 1000.0, "megabytes_per_second": 0.1,
        "latency_from": "send", "histogram": whole.encode().decode("ascii"),
        "errors": 0, "error_kinds": {}, "mismatches": 0, "sends": 0, "late_sends": 0,
        "held_sends": 0, "client_cpu_percent": 10.0, "client_spin_percent": 0.0,
        "client_saturated": False,
        "window": {"start": start, "end": start + seconds, "seconds": float(seconds)},
        "segment": {"index": index, "count": files},
        "parameters": {"connections": 10, "size": 64, "duration": float(seconds),
                       "processes": 1, "rate": None, "segment": f"{index}/{files}"},
        "per_second": [{"t": start + i, "requests": 1000, "histogram": h}
                       for i, h in enumerate(per_second)],
    }  # fmt: skip


PEAK = (  # a fresh parent per case: RUSAGE_CHILDREN's peak is then this report's alone
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)


def report(*paths: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MiB of the report process, its exit code."""
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK, sys.executable, "-m", "socket_echo", "report",
         *map(str, paths), "--json", "/dev/null"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - t
    peak_kib, code = done.stdout.split()
    return wall, int(peak_kib) / 1024, int(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=3600)
    ap.add_argument("--no-claim", action="store_true", help="skip the 10^8 segments case")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.no_claim:
            claim = folder / "claim.json"
            small = result(0, 1, 2, time.time() - 10)
            small["segment"] = {"index": 0, "count": 100_000_000}
            claim.write_text(json.dumps(small))
            wall, rss, code = report(claim)
            print(f"segment count 10^8 in a 2-second file: {wall:.2f} s, {rss:.0f} MiB peak, "
                  f"exit {code}")  # fmt: skip
        start = time.time() - args.seconds - 10
        paths = []
        for i in range(args.files):
            path = folder / f"r{i}.json"
            path.write_text(json.dumps(result(i, args.files, args.seconds, start)))
            paths.append(path)
        size = sum(p.stat().st_size for p in paths) / 2**20
        wall, rss, code = report(*paths)
        print(
            f"{args.files} results of {args.seconds} s ({size:.0f} MiB of JSON): "
            f"{wall:.2f} s, {rss:.0f} MiB peak, exit {code}"
        )


if __name__ == "__main__":
    main()
