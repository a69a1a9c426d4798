"""Side-by-side benchmark: socket-echo against a C epoll echo and an asyncio-streams echo.

Every server runs fresh for every measurement, pinned to CPU 0; the C load generator (which
verifies every byte) runs on CPU 1. Each scenario is repeated ``--runs`` times, interleaved
across servers; the tables show medians and ratios to the C reference.

    python benchmarks/run.py [--runs 3] [--duration 5] [--only pingpong,stream,idle,churn]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
RESULTS = HERE / "results"
SERVER_CPU, LOAD_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def compile_c() -> None:
    BUILD.mkdir(exist_ok=True)
    for name in ("echo_epoll", "loadgen", "udp_echo"):
        src, exe = HERE / "c" / f"{name}.c", BUILD / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)


def socket_echo(python: str, *flags: str) -> list[str]:
    """socket-echo as every benchmark runs it: quiet logs (no per-connection lines)."""
    return [python, "-m", "socket_echo", "serve", "--log-level", "warning", *flags]


BEFORE: str | None = None  # --before DIR: another checkout's code, measured beside this one


def at_before(argv: list[str]) -> list[str]:
    """A socket-echo command line run from the --before checkout's sources."""
    return ["env", f"PYTHONPATH={BEFORE}/src", *argv]


def servers(python: str) -> dict[str, list[str]]:
    # --metrics on: the targets must hold with the metrics endpoint serving (issue #6).
    se = socket_echo(python, "--host", "127.0.0.1", "--metrics", "127.0.0.1:0")
    table = {
        "C epoll (reference)": [str(BUILD / "echo_epoll"), "{port}"],
        "socket-echo (uvloop)": [*se, "--loop", "uvloop", "--port", "{port}"],  # auto: native
        "socket-echo (uvloop, --engine epoll)": [
            *se,
            "--loop",
            "uvloop",
            "--engine",
            "epoll",
            "--port",
            "{port}",
        ],
        "socket-echo (asyncio, --engine epoll)": [
            *se,
            "--loop",
            "asyncio",
            "--engine",
            "epoll",
            "--port",
            "{port}",
        ],
        "asyncio streams": [python, str(HERE / "streams_echo.py"), "{port}"],
    }
    if BEFORE:
        table["socket-echo @before (uvloop)"] = at_before(
            [*se, "--loop", "uvloop", "--port", "{port}"]
        )
    # The impaired path (impair/stream.py: a queue between what arrives and what goes back),
    # under a rate high enough never to hold back a 64 B ping-pong: its cost per echo.
    impaired = [*se, "--loop", "uvloop", "--bind", "tcp://127.0.0.1:{port}?rate=1GB"]
    table["socket-echo impaired ?rate=1GB (uvloop)"] = impaired
    if BEFORE:
        table["socket-echo @before impaired ?rate=1GB (uvloop)"] = at_before(impaired)
    return table


REFERENCE = "C epoll (reference)"
UDP_REFERENCE = "C recvfrom/sendto (reference)"


def udp_servers(python: str) -> dict[str, list[str]]:
    """UDP echo servers; socket-echo with its guard on and rate limits high enough that the
    benchmark's single source prefix is not throttled (the limiting code still runs)."""
    se = socket_echo(
        python,
        "--bind",
        "udp://127.0.0.1:{port}",
        "--udp-rate",
        "1e7",
        "--udp-burst",
        "100000",
        "--udp-max-rate",
        "1e7",
    )
    table = {
        UDP_REFERENCE: [str(BUILD / "udp_echo"), "{port}"],
        "socket-echo (uvloop)": [*se, "--loop", "uvloop"],
        "socket-echo (asyncio)": [*se, "--loop", "asyncio"],
        "socket-echo (uvloop, --udp-io loop)": [*se, "--loop", "uvloop", "--udp-io", "loop"],
    }
    if BEFORE:
        table["socket-echo @before (uvloop)"] = at_before([*se, "--loop", "uvloop"])
    return table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def udp_ping(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(b"ping", ("127.0.0.1", port))
        s.recvfrom(10)


def pinned(cpu: int):  # type: ignore[no-untyped-def]
    return lambda: os.sched_setaffinity(0, {cpu % os.cpu_count()})  # type: ignore[operator]


class Server:
    """A server on CPU 0, fresh per measurement. Ready when a TCP connect succeeds, a UDP
    ping is answered (``udp``), or ``ready(port)`` says so (a listener that answers neither:
    QUIC, DTLS)."""

    def __init__(
        self, argv: list[str], udp: bool = False, ready: Callable[[int], bool] | None = None
    ) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [a.replace("{port}", str(self.port)) for a in argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pinned(SERVER_CPU),
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if ready is not None:
                    if not ready(self.port):
                        raise OSError("not bound yet")
                elif udp:
                    udp_ping(self.port)
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"server did not start: {argv}") from None
                time.sleep(0.05)
        time.sleep(0.2)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss(self) -> int:
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * PAGE

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def loadgen(mode: str, port: int, conns: int, size: int, seconds: float) -> dict[str, Any]:
    cmd = [
        str(BUILD / "loadgen"),
        mode,
        "127.0.0.1",
        str(port),
        str(conns),
        str(size),
        str(seconds),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=pinned(LOAD_CPU), timeout=seconds + 120
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_throughput(
    argv: list[str], mode: str, conns: int, size: int, secs: float
) -> dict[str, Any]:
    """One load run against a fresh server; adds its CPU time per request (or datagram)."""
    server = Server(argv, udp=mode == "udp")
    try:
        cpu0 = server.cpu_seconds()
        r = loadgen(mode, server.port, conns, size, secs)
        cpu = server.cpu_seconds() - cpu0
    finally:
        server.stop()
    r["server_cpu_s"] = cpu
    if r["total_requests"]:
        r["server_cpu_us_per_req"] = cpu / r["total_requests"] * 1e6
    if mode == "stream" and r.get("megabytes_per_second"):
        # CPU over the whole run per GB echoed over the whole run (warm-up included for all)
        r["server_cpu_s_per_gb"] = cpu / (r["megabytes_per_second"] * r["seconds"] / 1e3)
    return r


def shown(ratio: float, target: float) -> str:
    """A ratio to two places, or three where two would print the target itself for a ratio
    that is not the target (0.996 against >= 1.0 shows "0.996 ❌", not "1.00 ❌")."""
    two = f"{ratio:.2f}"
    return f"{ratio:.3f}" if float(two) == target and ratio != target else two


def run_udp(argv: list[str], secs: float) -> dict[str, Any]:
    return run_throughput(argv, "udp", 50, 64, secs)


def udp_report(udp: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "",
        "UDP ping-pong, 50 sockets x 64 B (guard and rate limits on):",
        "",
        "| server | datagrams/s | server CPU µs/datagram | datagrams per CPU-second vs C |",
        "|---|---|---|---|",
    ]
    ref = udp[UDP_REFERENCE]
    for name, runs in udp.items():
        if name == UDP_REFERENCE:
            ratio = "1.00x"
        else:
            r = paired_ratio(ref, runs, "server_cpu_us_per_req")  # C cpu / our cpu
            ok = r is not None and r >= 0.95
            verdict = "✅" if ok else "❌"
            ratio = "—" if r is None else f"{shown(r, 0.95)}x {verdict} (target ≥ 0.95x)"
        lines.append(
            f"| {name} | {fmt(median(runs, 'requests_per_second'))} | "
            f"{fmt(median(runs, 'server_cpu_us_per_req'))} | {ratio} |"
        )
    return "\n".join(lines)


def run_idle(argv: list[str], conns: int) -> dict[str, Any]:
    server = Server(argv)
    cmd = [str(BUILD / "loadgen"), "idle", "127.0.0.1", str(server.port), str(conns), "1", "60"]
    try:
        rss0 = server.rss()
        gen = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pinned(LOAD_CPU),
        )
        assert gen.stdout is not None and gen.stdin is not None
        ready = gen.stdout.readline().split()
        time.sleep(1.0)
        rss1 = server.rss()
        gen.stdin.close()
        r: dict[str, Any] = json.loads(gen.stdout.read().strip().splitlines()[-1])
        gen.wait(30)
    finally:
        server.stop()
    if ready and ready[0] == "READY":
        r["connect_seconds"] = float(ready[2])
    r["rss_growth_kib_per_conn"] = (rss1 - rss0) / 1024 / max(1, r["established"])
    return r


def run_generators(secs: float, runs: int) -> dict[str, list[dict[str, Any]]]:
    """The C load generator and ``socket-echo bench --processes 1`` against the C reference
    server, 50 x 64 B ping-pong, each on CPU 1, interleaved runs."""
    out: dict[str, list[dict[str, Any]]] = {"C loadgen": [], "socket-echo bench -p 1": []}
    if BEFORE:
        out["socket-echo @before bench -p 1"] = []
    ref = servers(sys.executable)[REFERENCE]
    for _ in range(runs):
        server = Server(ref)
        try:
            out["C loadgen"].append(loadgen("pingpong", server.port, 50, 64, secs))
            cmd = [sys.executable, "-m", "socket_echo", "bench", f"127.0.0.1:{server.port}",
                   "-c", "50", "-s", "64", "-d", str(secs), "-p", "1", "--json", "-"]  # fmt: skip
            for name in [k for k in out if k != "C loadgen"]:
                argv = at_before(cmd) if "@before" in name else cmd
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=secs + 60,
                    preexec_fn=pinned(LOAD_CPU),
                )  # fmt: skip
                text = done.stdout
                out[name].append(json.loads(text[text.index("{") :]))
        finally:
            server.stop()
    return out


def generators_report(gen: dict[str, list[dict[str, Any]]]) -> str:
    c, py = gen["C loadgen"], gen["socket-echo bench -p 1"]
    ratio = paired_ratio(py, c, "requests_per_second")
    lines = [
        "",
        "Load generators against the C reference server (50 x 64 B ping-pong, on CPU 1):",
        "",
        "| load generator | req/s | p99 µs | errors + mismatches |",
        "|---|---|---|---|",
        f"| C loadgen | {fmt(median(c, 'requests_per_second'))} | {fmt(median(c, 'p99_us'))} "
        f"| {sum(r['errors'] + r['mismatches'] for r in c)} |",
        f"| socket-echo bench --processes 1 | {fmt(median(py, 'requests_per_second'))} | "
        f"{fmt(statistics.median(r['latency_us']['p99'] for r in py))} | "
        f"{sum(r['errors'] + r['mismatches'] for r in py)} |",
    ]
    if "socket-echo @before bench -p 1" in gen:
        before = gen["socket-echo @before bench -p 1"]
        paired = paired_ratio(py, before, "requests_per_second")
        lines.append(
            f"| socket-echo @before bench --processes 1 | "
            f"{fmt(median(before, 'requests_per_second'))} | "
            f"{fmt(statistics.median(r['latency_us']['p99'] for r in before))} | "
            f"{sum(r['errors'] + r['mismatches'] for r in before)} |"
        )
        if paired is not None:
            lines += ["", f"bench now / @before, req/s: {paired:.2f}x (paired)"]
    if ratio is not None:
        lines += [
            "",
            f"socket-echo bench / C loadgen, req/s: {ratio:.2f}x (target ≥ 0.95x) "
            f"{'✅' if ratio >= 0.95 else '❌'}",
        ]
    return "\n".join(lines)


SCENARIOS = {
    "pingpong": (
        "50 conns x 64 B ping-pong",
        lambda a, d: run_throughput(a, "pingpong", 50, 64, d),
    ),
    "pingpong1000": (
        "1000 conns x 64 B ping-pong",
        lambda a, d: run_throughput(a, "pingpong", 1000, 64, d),
    ),
    "stream": (
        "1 conn streaming 64 KiB writes",
        lambda a, d: run_throughput(a, "stream", 1, 65536, d),
    ),
    "idle": ("9,000 idle conns", lambda a, d: run_idle(a, 9000)),
    "churn": (
        "churn: connect, 64 B echo, close (50 at once)",
        lambda a, d: run_throughput(a, "churn", 50, 64, d),
    ),
}

# (scenario, metric, label, higher_is_better, target vs reference): the native path's
# targets; the pure paths are measured against the same lines for comparison.
TARGETS = [
    ("pingpong", "requests_per_second", "ping-pong req/s", True, 1.00),
    ("pingpong", "server_cpu_us_per_req", "ping-pong server CPU µs/req", False, 1.05),
    ("pingpong1000", "requests_per_second", "1000-conn ping-pong req/s", True, 1.00),
    ("pingpong1000", "server_cpu_us_per_req", "1000-conn server CPU µs/req", False, 1.05),
    ("stream", "megabytes_per_second", "stream MB/s", True, 1.00),
    ("stream", "server_cpu_s_per_gb", "stream server CPU per GB", False, 1.05),
    ("idle", "connect_seconds", "9k idle: time to establish all", False, 1.0),
    ("churn", "server_cpu_us_per_req", "churn server CPU µs/conn", False, 1.10),
]


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def paired_ratio(
    runs: list[dict[str, Any]], ref_runs: list[dict[str, Any]], key: str
) -> float | None:
    """Median over runs of (this server's run / the reference run beside it in time): this
    machine's speed drifts between runs (neighbours on the host), and pairing cancels drift."""
    ratios = [
        r[key] / ref[key]
        for r, ref in zip(runs, ref_runs, strict=True)
        if r.get(key) is not None and ref.get(key)
    ]
    return statistics.median(ratios) if ratios else None


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def machine(runs: int, secs: float) -> str:
    """The line every report starts with: the machine, the pinning, the runs."""
    return (
        f"Machine: {platform.node() and 'this host'}, {os.cpu_count()} cores "
        f"({cpu_model()}), Linux {platform.release()}, Python {platform.python_version()}; "
        f"server pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}; "
        f"medians of {runs} runs of {secs:g} s."
    )


def report(results: dict[str, dict[str, list[dict[str, Any]]]], runs: int, secs: float) -> str:
    names = list(next(iter(results.values())).keys())
    lines = [
        machine(runs, secs),
        "",
        "| server | 50x64B req/s | p99 µs | CPU µs/req | stream MB/s | 9k idle: s to connect "
        "| KiB/conn | churn conn/s | churn CPU µs/conn | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:

        def m(scn: str, key: str, name: str = name) -> float | None:
            return median(results[scn][name], key) if scn in results else None

        errors = sum(r["errors"] + r["mismatches"] for scn in results for r in results[scn][name])
        lines.append(
            f"| {name} | {fmt(m('pingpong', 'requests_per_second'))} | "
            f"{fmt(m('pingpong', 'p99_us'))} | {fmt(m('pingpong', 'server_cpu_us_per_req'))} | "
            f"{fmt(m('stream', 'megabytes_per_second'))} | {fmt(m('idle', 'connect_seconds'))} | "
            f"{fmt(m('idle', 'rss_growth_kib_per_conn'))} | "
            f"{fmt(m('churn', 'connections_per_second'))} | "
            f"{fmt(m('churn', 'server_cpu_us_per_req'))} | {errors} |"
        )
    lines += [
        "",
        "Ratios to the C reference, median of per-run paired ratios "
        "(socket-echo with every limit, timeout and counter on):",
        "",
        "| metric | target | " + " | ".join(n for n in names if n != REFERENCE) + " |",
        "|---|---|" + "---|" * (len(names) - 1),
    ]
    for scn, key, label, higher, target in TARGETS:
        if scn not in results:
            continue
        cells = []
        for name in names:
            if name == REFERENCE:
                continue
            ratio = paired_ratio(results[scn][name], results[scn][REFERENCE], key)
            if ratio is None:
                cells.append("—")
                continue
            ok = ratio >= target if higher else ratio <= target
            cells.append(
                f"{shown(ratio, target)}x {'✅' if ok else '❌'}"
                if name.startswith("socket-echo")
                else f"{ratio:.2f}x"
            )
        bound = f"≥ {target}x" if higher else f"≤ {target}x"
        lines.append(f"| {label} | {bound} | " + " | ".join(cells) + " |")
    if "idle" in results:
        cells = []
        for name in names:
            if name == REFERENCE:
                continue
            v = median(results["idle"][name], "rss_growth_kib_per_conn")
            cells.append(
                "—"
                if v is None
                else f"{v:.2f} KiB {'✅' if v <= 0.6 and name.startswith('socket-echo') else ''}"
            )
        lines.append("| 9k idle: RSS growth per conn | ≤ 0.6 KiB | " + " | ".join(cells) + " |")
    if "pingpong" in results:
        se = median(results["pingpong"].get("socket-echo (uvloop)", []), "requests_per_second")
        st = median(results["pingpong"].get("asyncio streams", []), "requests_per_second")
        if se and st:
            lines += [
                "",
                f"socket-echo (uvloop) vs asyncio streams, 50x64B req/s: {se / st:.2f}x "
                f"(target ≥ 1.5x) {'✅' if se / st >= 1.5 else '❌'}",
            ]
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument(
        "--only",
        default=",".join([*SCENARIOS, "udp", "tls", "generators"]),
        help="comma-separated scenarios (and 'generators': bench vs C loadgen)",
    )
    ap.add_argument("--servers", default="", help="comma-separated substrings of server names")
    ap.add_argument(
        "--before",
        metavar="DIR",
        help="also run socket-echo from another checkout (its src/), paired with this one",
    )
    args = ap.parse_args()
    global BEFORE
    BEFORE = args.before
    compile_c()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    requested = set(chosen)
    with_generators = "generators" in chosen
    with_udp = "udp" in chosen
    chosen = [s for s in chosen if s not in ("generators", "udp", "tls")]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    table = servers(sys.executable)
    if args.servers:
        keep = [s.strip() for s in args.servers.split(",")]
        table = {k: v for k, v in table.items() if k == REFERENCE or any(s in k for s in keep)}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for scn in chosen:
        title, fn = SCENARIOS[scn]
        results[scn] = {name: [] for name in table}
        for run in range(args.runs):
            for name, argv in table.items():
                r = fn(argv, args.duration)
                results[scn][name].append(r)
                print(
                    f"[{title}] run {run + 1}/{args.runs} {name}: "
                    + ", ".join(
                        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()
                        if k not in ("mode", "size")
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    text = report(results, args.runs, args.duration) if results else ""
    if with_udp:
        udp_table = udp_servers(sys.executable)
        udp: dict[str, list[dict[str, Any]]] = {name: [] for name in udp_table}
        for run in range(args.runs):
            for name, argv in udp_table.items():
                udp[name].append(run_udp(argv, args.duration))
                print(
                    f"[udp] run {run + 1}/{args.runs} {name}: "
                    f"{udp[name][-1]['requests_per_second']:.0f} datagrams/s",
                    file=sys.stderr,
                    flush=True,
                )
        results["udp"] = udp
        text += "\n" + udp_report(udp)
    if "tls" in requested:
        from tls_load import run_tls, tls_report

        tls = run_tls(args.duration, args.runs)
        results["tls"] = tls
        text += "\n" + tls_report(tls)
    if with_generators:
        gen = run_generators(args.duration, args.runs)
        results["generators"] = {k: v for k, v in gen.items()}
        text += "\n" + generators_report(gen)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "latest.md").write_text(text + "\n")
    print(text)
    bad = sum(
        r["errors"] + r["mismatches"] for s in results.values() for rs in s.values() for r in rs
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
