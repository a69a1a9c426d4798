"""bench's worker processes: the run's share of the load (``--segment I/N``: this machine's
part of a run spread over N) divided among them, started together, and what they measured
collected. Each process runs its mode's loop (loop.py and a module per mode: pingpong.py,
stream.py, churn.py, datagrams.py) or, over QUIC and DTLS, secure.py's worker.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from socket_echo.kinds import DTLS, QUIC, kind
from socket_echo.tools.bench import errors
from socket_echo.tools.bench.churn import Churn
from socket_echo.tools.bench.datagrams import Datagrams, GroupDatagrams, GroupOpenLoop
from socket_echo.tools.bench.loop import Loop
from socket_echo.tools.bench.model import BenchConfig, WorkerResult, split
from socket_echo.tools.bench.pingpong import pingpong_loop
from socket_echo.tools.bench.stream import Stream


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
    hard_deadline = (
        started + wait + cfg.warmup + cfg.duration + cfg.timeout + cfg.drain_timeout + 30
    )
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
        lost.errors[errors.WORKER_SILENT] += len(procs) - len(collected)
        collected[-1] = lost
    return list(collected.values())


def mode_loop(cfg: BenchConfig) -> type[Loop]:
    """The Loop of the run's mode."""
    if cfg.mode == "pingpong":
        return pingpong_loop(cfg)
    if cfg.target.group is not None:  # a multicast group: every member counted apart
        return GroupOpenLoop if cfg.rate else GroupDatagrams
    return {"stream": Stream, "churn": Churn, "udp": Datagrams}[cfg.mode]


def worker_main(
    cfg: BenchConfig,
    connections: int,
    rate: float,
    index: int,
    progress: Any,
    results: Any,
    probe: bool = False,
) -> None:
    """One load process: its share of the connections and of the rate (``probe``: the
    latency-under-load flow)."""
    try:
        if kind(cfg.target.scheme).served_by in (QUIC, DTLS):
            from socket_echo.tools.bench.secure import SecureWorker

            result = SecureWorker(cfg, connections, rate, index, progress).run()
        else:
            result = mode_loop(cfg)(cfg, connections, rate, index, progress).run()
        result.probe = probe
        results.put((index, result))
    except Exception as exc:  # reported by the parent as this worker's error
        failed = WorkerResult()
        failed.errors[errors.because(errors.WORKER_FAILED, repr(exc))] += 1
        results.put((index, failed))
