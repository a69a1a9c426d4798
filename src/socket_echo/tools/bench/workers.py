"""``socket-echo bench``: a verifying load generator for any echo server, on one machine or
many. This module runs one run: it divides the run's share of the load (``--segment I/N``:
this machine's part of a run spread over N) among worker processes, starts them together,
and collects what they measured. The workers are load.py (TCP, Unix, UDP) and
bench_secure.py (QUIC, DTLS); the figures are stats.py's, the advice and plot advice.py's.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from socket_echo.tools.bench.load import worker_main
from socket_echo.tools.bench.model import BenchConfig, WorkerResult, split


def run_workers(cfg: BenchConfig, on_progress: Any = None) -> list[WorkerResult]:
    """Fork the workers, each with its share of the connections and of the rate (every
    connection has the same request rate), and gather their results."""
    connections, rate = cfg.share
    shares = [n for n in split(connections, cfg.processes) if n > 0]
    ctx = multiprocessing.get_context("fork")
    counters = [ctx.Value("q", 0, lock=False) for _ in shares]
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=worker_main,
            args=(cfg, n, rate * n / connections, i, counters[i], results),
            daemon=True,
        )
        for i, n in enumerate(shares)
    ]
    if cfg.probe_rate:  # the latency-under-load flow, in a process of its own
        probe = cfg.probe()
        index = len(procs)
        procs.append(
            ctx.Process(
                target=worker_main,
                args=(probe, 1, probe.rate, index, ctx.Value("q", 0, lock=False), results, True),
                daemon=True,
            )
        )
    for p in procs:
        p.start()
    collected: dict[int, WorkerResult] = {}
    started = time.monotonic()
    wait = max(0.0, (cfg.start_at or 0.0) - time.time())
    hard_deadline = started + wait + cfg.warmup + cfg.duration + cfg.timeout + 30
    while len(collected) < len(procs) and time.monotonic() < hard_deadline:
        try:
            index, result = results.get(timeout=0.5)
            collected[index] = result
        except Exception:  # queue.Empty
            pass
        if on_progress is not None:
            on_progress(time.monotonic() - started, sum(int(c.value) for c in counters))
    for p in procs:
        p.join(1)
        if p.is_alive():
            p.kill()
    if len(collected) < len(procs):
        lost = WorkerResult()
        lost.errors["a worker did not report"] += len(procs) - len(collected)
        collected[-1] = lost
    return list(collected.values())
