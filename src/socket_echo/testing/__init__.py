"""socket-echo from Python: a real echo server for tests, and the probe and bench verdicts as
typed results (the same fields as ``--json``), so a test needs no subprocess to parse.

    from socket_echo.testing import serve, probe, bench

    with serve("tcp://127.0.0.1:0", "udp://127.0.0.1:0") as server:
        assert probe(server.target).conforms
        run = bench(server.target, connections=4, duration=1, slo=("p99<5ms", "errors==0"))
        assert run.passed, run.slo

A board instead of a server (Zephyr's twister runs pytest): ``probe("tcp://192.0.2.1:4242")``.
The pytest plugin (``socket_echo.testing.plugin``, registered as a ``pytest11`` entry point)
gives the fixtures ``echo_server`` and ``echo_server_factory``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from socket_echo.tools.bench.result import BenchResult
from socket_echo.tools.bench.slo import Verdict
from socket_echo.tools.probe.steps import FAIL, FINDING, Step

__all__ = ["BenchRun", "ProbeResult", "Server", "bench", "probe", "serve"]

LISTENING = re.compile(r"listening on ([\w+]+://\S+) \(")
METRICS = re.compile(r"metrics and health on (http://\S+) ")


@dataclasses.dataclass
class Server:
    """A socket-echo server running in a subprocess, for a test's duration."""

    process: subprocess.Popen[str]
    targets: list[str]  # every listener, as a URL, with the port it got
    metrics_url: str | None

    @property
    def target(self) -> str:
        """The first listener's URL (``tcp://127.0.0.1:PORT`` for ``echo_server``)."""
        return self.targets[0]

    def target_of(self, scheme: str) -> str:
        return next(t for t in self.targets if t.startswith(scheme + "://"))

    def metrics(self) -> dict[str, float]:
        """The server's /metrics, sample by sample (``name{labels}`` -> value)."""
        assert self.metrics_url is not None, "serve(..., metrics=True)"
        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples


@contextlib.contextmanager
def serve(*binds: str, metrics: bool = True, **settings: Any) -> Iterator[Server]:
    """A real server with these listeners (``tcp://127.0.0.1:0``: a free port; none given:
    TCP and UDP on 127.0.0.1, free ports), ``settings`` as flags (``idle_timeout=5`` is
    ``--idle-timeout 5``; True is a bare flag). Stopped (SIGTERM, then killed) on exit."""
    argv = [sys.executable, "-m", "socket_echo", "serve"]
    for bind in binds or ("tcp://127.0.0.1:0", "udp://127.0.0.1:0"):
        argv += ["--bind", bind]
    if metrics:
        argv += ["--metrics", "127.0.0.1:0"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SOCKET_ECHO_LOG_FORMAT": "text"},
    )  # fmt: skip
    try:
        targets, metrics_url = _wait_ready(proc, len(binds or (0, 0)), metrics)
        yield Server(proc, targets, metrics_url)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_ready(
    proc: subprocess.Popen[str], listeners: int, metrics: bool
) -> tuple[list[str], str | None]:
    assert proc.stderr is not None
    targets: list[str] = []
    metrics_url = None
    deadline = time.monotonic() + 20
    lines: list[str] = []
    while len(targets) < listeners or (metrics and metrics_url is None):
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("socket-echo did not start: " + " | ".join(lines[-5:]))
        lines.append(line.strip())
        if m := LISTENING.search(line):
            targets.append(m.group(1))
        if m := METRICS.search(line):
            metrics_url = m.group(1)
        if time.monotonic() > deadline:
            raise RuntimeError("socket-echo did not start within 20 s")
    return targets, metrics_url


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    target: str
    steps: tuple[Step, ...]

    @property
    def conforms(self) -> bool:
        return all(s.status != FAIL for s in self.steps)

    @property
    def findings(self) -> list[str]:
        return [s.detail for s in self.steps if s.status == FINDING]

    @property
    def failures(self) -> list[str]:
        return [f"{s.name}: {s.detail}" for s in self.steps if s.status == FAIL]


def probe(
    target: str, timeout: float = 5.0, require_concurrency: bool = False, **tls: Any
) -> ProbeResult:
    """probe's steps against ``target`` (any kind); ``tls``: ca_file, insecure, server_name.
    ``socket_echo.tools.connect.target.Unreachable`` when nothing answers."""
    from socket_echo.config import DEFAULT_QUIC_ALPN
    from socket_echo.kinds import DTLS, QUIC, kind
    from socket_echo.tools.connect.target import TlsOptions, parse_target

    t = parse_target(target)
    options = TlsOptions(**tls) if tls else None
    served_by = kind(t.scheme).served_by
    if served_by == QUIC:
        from socket_echo.tools.probe import quic

        steps = quic.run(t, timeout, options, DEFAULT_QUIC_ALPN[0])
    elif served_by == DTLS:
        from socket_echo.tools.probe import dtls

        steps = dtls.run(t, timeout, options)
    else:
        from socket_echo.tools.probe.stream import run

        steps = run(t, timeout, options, require_concurrency)
    return ProbeResult(t.url, tuple(steps))


@dataclasses.dataclass(frozen=True)
class BenchRun:
    """A bench run's result (every field of ``--json``, as ``result``; read through too:
    ``run.latency_us.p99``) and its objectives' verdicts."""

    result: BenchResult
    slo: tuple[Verdict, ...] = ()

    @property
    def passed(self) -> bool:
        """No error, no mismatch, and every objective met."""
        return not self.result.failed and all(v.passed for v in self.slo)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.result, name)


def bench(target: str, slo: tuple[str, ...] = (), **options: Any) -> BenchRun:
    """A bench run against ``target``: ``options`` are BenchConfig's (``connections``,
    ``duration``, ``mode``, ``rate``, ``size``, ``processes`` (default 1), ...); ``slo``: the
    objectives, judged on the result. ConfigError for a run that cannot be."""
    from socket_echo.tools.bench import statistics, workers
    from socket_echo.tools.bench.model import BenchConfig
    from socket_echo.tools.bench.run import check_reachable
    from socket_echo.tools.bench.slo import for_run, parse
    from socket_echo.tools.connect.target import parse_target

    options.setdefault("processes", 1)
    cfg = BenchConfig(target=parse_target(target), **options)
    objectives = for_run(tuple(parse(text) for text in slo), cfg.target.group is not None)
    check_reachable(cfg)
    result = statistics.summarize(cfg, workers.run_workers(cfg))
    return BenchRun(result, tuple(o.judge(result) for o in objectives))
