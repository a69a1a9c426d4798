"""Soak: mixed traffic against one real server for a while, watching it for leaks.

    make soak DURATION=1800          # or: python tests/soak.py --duration 1800 [--json FILE]

Traffic, all on loopback and all verified byte for byte: ping-pong on persistent
connections (random sizes), a stream of 1 MiB exchanges, churn (connect, echo, close), UDP
ping-pong, TLS sessions that reconnect, QUIC connections (several streams each, FIN
mirrored) and DTLS sessions (records) that reconnect. Every SAMPLE_EVERY seconds it samples
RSS, open descriptors, asyncio tasks and open connections. It fails on any byte mismatch, on
a traffic kind that stopped making progress, and on growth after the warm-up beyond the
bounds below (comparing the first and the last third of the samples after warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

SAMPLE_EVERY = 2.0  # seconds; a short run (make test's) samples every duration/15 s
WARM_UP = 0.2  # of the duration, at least 10 s (a third of a run shorter than 30 s)
BOUNDS = {  # growth allowed after warm-up, last third vs first third (medians)
    "rss_mib": 8.0,
    "fds": 16,
    "tasks": 16,
    "connections": 16,
}
LISTEN_RE = re.compile(r'"listener":"(tcp|udp|tls|quic|dtls|http)://127\.0\.0\.1:(\d+)"')
KINDS = ("tcp", "udp", "tls", "quic", "dtls", "http")


class Soak:
    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.sample_every = min(SAMPLE_EVERY, duration / 15)
        self.deadline = 0.0
        self.counts: Counter[str] = Counter()  # operations done, by kind
        self.problems: list[str] = []
        self.samples: list[dict[str, float]] = []
        self.lock = threading.Lock()
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[str] | None = None

    # -- the server ----------------------------------------------------------------------
    def start_server(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "socket_echo",
            "serve",
            "--bind",
            "tcp://127.0.0.1:0",
            "--bind",
            "udp://127.0.0.1:0",
            "--bind",
            "tls://127.0.0.1:0",
            "--bind",
            "quic://127.0.0.1:0",
            "--bind",
            "dtls://127.0.0.1:0",
            "--tls-self-signed",
            "--metrics",
            "127.0.0.1:0",
            "--udp-rate",
            "1e6",
            "--udp-burst",
            "100000",
            "--udp-max-rate",
            "1e6",
            "--log-format",
            "json",
            "--no-access-log",
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.proc.stdout is not None
        started = time.monotonic()
        while len(self.ports) < len(KINDS):
            line = self.proc.stdout.readline()
            if not line or time.monotonic() - started > 20:
                raise RuntimeError("the server did not start")
            if m := LISTEN_RE.search(line):
                self.ports[m.group(1)] = int(m.group(2))
        threading.Thread(target=self._drain_log, daemon=True).start()

    def _drain_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if '"level":"error"' in line or "Traceback" in line:
                self.problem(f"server log: {line.strip()[:200]}")

    def stop_server(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9

    # -- bookkeeping ---------------------------------------------------------------------
    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(text)

    def done(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.counts[kind] += n

    def running(self) -> bool:
        return time.monotonic() < self.deadline and len(self.problems) < 50

    # -- traffic -------------------------------------------------------------------------
    def _echo(self, sock: socket.socket, payload: bytes) -> bool:
        sock.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = sock.recv(min(1 << 20, len(payload) - len(got)))
            if not chunk:
                self.problem(f"closed after {len(got)} of {len(payload)} B")
                return False
            got += chunk
        if got != payload:
            self.problem(f"byte mismatch in a {len(payload)} B echo")
            return False
        return True

    def pingpong(self, seed: int) -> None:
        rand = random.Random(seed)
        with socket.create_connection(("127.0.0.1", self.ports["tcp"]), timeout=10) as sock:
            while self.running():
                if not self._echo(sock, rand.randbytes(rand.randint(1, 4096))):
                    return
                self.done("pingpong")
                time.sleep(0.001)

    def stream(self) -> None:
        rand = random.Random(1)
        block = rand.randbytes(1 << 20)
        with socket.create_connection(("127.0.0.1", self.ports["tcp"]), timeout=10) as sock:
            while self.running():
                sender = threading.Thread(target=sock.sendall, args=(block,))
                sender.start()
                got = bytearray()
                while len(got) < len(block):
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    got += chunk
                sender.join()
                if got != block:
                    self.problem("byte mismatch in the stream")
                    return
                self.done("stream MiB")
                time.sleep(0.05)

    def churn(self) -> None:
        rand = random.Random(2)
        while self.running():
            with socket.create_connection(("127.0.0.1", self.ports["tcp"]), timeout=10) as s:
                if not self._echo(s, rand.randbytes(64)):
                    return
            self.done("churn")
            time.sleep(0.002)

    def udp(self, seed: int) -> None:
        rand = random.Random(seed)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.connect(("127.0.0.1", self.ports["udp"]))
            seq = 0
            while self.running():
                seq += 1
                payload = seq.to_bytes(8, "big") + rand.randbytes(rand.randint(0, 1400))
                sock.send(payload)
                try:
                    while (got := sock.recv(65535)) != payload:
                        if got[:8] < payload[:8]:
                            continue  # a late answer to one already counted lost
                        self.problem("UDP byte mismatch")
                        return
                except TimeoutError:
                    self.done("udp lost")
                    continue
                self.done("udp")
                time.sleep(0.001)

    def tls(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        rand = random.Random(3)
        while self.running():
            raw = socket.create_connection(("127.0.0.1", self.ports["tls"]), timeout=10)
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                for _ in range(rand.randint(1, 20)):
                    if not self._echo(sock, rand.randbytes(rand.randint(1, 16384))):
                        return
                    self.done("tls messages")
            self.done("tls sessions")
            time.sleep(0.01)

    def quic(self) -> None:
        """QUIC connections of 1-8 streams each, every stream a random message then FIN."""
        from aioquic.asyncio.client import connect

        from socket_echo.tools.connect.quic import QuicClient, configuration
        from socket_echo.tools.connect.target import Target, TlsOptions

        target = Target("quic", "127.0.0.1", self.ports["quic"])
        config = configuration("echo-quic", TlsOptions(insecure=True), target.host)
        rand = random.Random(4)

        async def session() -> bool:
            async with connect(
                target.host, target.port, configuration=config, create_protocol=QuicClient
            ) as client:
                assert isinstance(client, QuicClient)
                sent = {}
                for _ in range(rand.randint(1, 8)):
                    sid = client._quic.get_next_available_stream_id()
                    sent[sid] = rand.randbytes(rand.randint(1, 65536))
                    client.send(sid, sent[sid], end=True)
                await client.until(lambda: client.ended >= set(sent), 10, "QUIC echo")
                if any(bytes(client.got[sid]) != data for sid, data in sent.items()):
                    self.problem("QUIC byte mismatch")
                    return False
                self.done("quic streams", len(sent))
            return True

        async def main() -> None:
            while self.running():
                if not await session():
                    return
                self.done("quic connections")
                await asyncio.sleep(0.01)

        asyncio.run(main())

    def dtls(self) -> None:
        """DTLS sessions of 1-20 records each (up to 16 KiB, one record each), reconnecting."""
        from socket_echo.tools.connect.dtls import open_dtls
        from socket_echo.tools.connect.target import Target, TlsOptions

        target = Target("dtls", "127.0.0.1", self.ports["dtls"])
        rand = random.Random(5)

        async def main() -> None:
            while self.running():
                client = await open_dtls(target, TlsOptions(insecure=True), 10)
                try:
                    for _ in range(rand.randint(1, 20)):
                        record = rand.randbytes(rand.randint(1, 16384))
                        client.send(record)
                        echo = await client.recv(2.0)
                        if echo is None:
                            self.done("dtls lost")  # UDP: loopback may drop under load
                            continue
                        if echo != record:
                            self.problem("DTLS byte mismatch")
                            return
                        self.done("dtls records")
                finally:
                    client.close()
                self.done("dtls sessions")
                await asyncio.sleep(0.01)

        asyncio.run(main())

    def _guard(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except Exception as exc:  # any failure of the traffic is a finding, not a crash
            self.problem(f"{target.__name__}: {type(exc).__name__}: {exc}")

    # -- sampling ------------------------------------------------------------------------
    def sample(self) -> dict[str, float]:
        assert self.proc is not None
        pid = self.proc.pid
        with open(f"/proc/{pid}/status") as f:
            rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        metrics: dict[str, float] = {}
        url = f"http://127.0.0.1:{self.ports['http']}/metrics"
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                metrics[name] = float(value)
        return {
            "t": round(time.monotonic() - (self.deadline - self.duration), 1),
            "rss_mib": round(rss_kib / 1024, 2),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "tasks": metrics.get("socket_echo_tasks", 0.0),
            "connections": metrics.get("socket_echo_connections_active", 0.0),
        }

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.start_server()
        self.deadline = time.monotonic() + self.duration
        workers = [
            *(threading.Thread(target=self._guard, args=(self.pingpong, i)) for i in range(8)),
            threading.Thread(target=self._guard, args=(self.stream,)),
            threading.Thread(target=self._guard, args=(self.churn,)),
            *(threading.Thread(target=self._guard, args=(self.udp, 10 + i)) for i in range(4)),
            threading.Thread(target=self._guard, args=(self.tls,)),
            threading.Thread(target=self._guard, args=(self.quic,)),
            threading.Thread(target=self._guard, args=(self.dtls,)),
        ]
        for w in workers:
            w.start()
        while self.running():
            self.samples.append(self.sample())
            time.sleep(min(self.sample_every, max(0.0, self.deadline - time.monotonic())))
        for w in workers:
            w.join(30)
        self.samples.append(self.sample())
        code = self.stop_server()
        if code != 0:
            self.problem(f"the server exited with {code} on SIGTERM")
        return self.verdict()

    def verdict(self) -> dict[str, Any]:
        warm = max(min(10.0, self.duration / 3), self.duration * WARM_UP)
        settled = [s for s in self.samples if s["t"] >= warm]
        growth: dict[str, float] = {}
        if len(settled) >= 3:
            third = max(1, len(settled) // 3)
            for key, bound in BOUNDS.items():
                first = statistics.median(s[key] for s in settled[:third])
                last = statistics.median(s[key] for s in settled[-third:])
                growth[key] = round(last - first, 2)
                if last - first > bound:
                    self.problem(f"{key} grew by {last - first:g} after warm-up (bound {bound})")
        for kind in (
            "pingpong",
            "stream MiB",
            "churn",
            "udp",
            "tls sessions",
            "quic connections",
            "dtls sessions",
        ):
            if not self.counts[kind]:
                self.problem(f"no {kind} completed")
        return {
            "duration_s": self.duration,
            "operations": dict(self.counts),
            "growth_after_warm_up": growth,
            "bounds": BOUNDS,
            "peak": {k: max(s[k] for s in self.samples) for k in BOUNDS},
            "samples": len(self.samples),
            "problems": self.problems,
            "passed": not self.problems,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    ap.add_argument("--json", help="write the result and every sample here")
    args = ap.parse_args()
    soak = Soak(args.duration)
    result = soak.run()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "series": soak.samples}, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))
    for problem in result["problems"]:
        print(f"soak: FAIL: {problem}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
