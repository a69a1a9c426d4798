"""``socket-echo bench``: one run, from its config to its exit code (uvicorn's shape: flags ->
a config that checks itself -> ``run(config) -> exit code``). Reachable first (one line, exit 2,
when it is not: a wrong port or certificate is said once, not counted for the whole run), then
the workers (workers.py), the result (statistics.py), its outputs (output.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from socket_echo.exits import FAILED, OK, SLO_MISSED, UNREACHABLE, ToolError
from socket_echo.kinds import DTLS, QUIC, kind
from socket_echo.tools.bench import output, slo, statistics, workers
from socket_echo.tools.bench.compare import Comparison
from socket_echo.tools.bench.model import BenchConfig
from socket_echo.tools.bench.pingpong import native_pingpong
from socket_echo.tools.bench.result import BenchResult
from socket_echo.tools.bench.slo import Objective
from socket_echo.tools.connect.target import Unreachable, check_datagrams_reach, connect


def check_reachable(cfg: BenchConfig) -> None:
    """One connection (or handshake) before the run; ToolError (exit 2) when none is had."""
    try:
        if kind(cfg.target.scheme).served_by in (QUIC, DTLS):
            from socket_echo.tools.bench.secure import check_reachable as handshake

            handshake(cfg.target, cfg.tls, cfg.timeout, cfg.alpn)
        elif kind(cfg.target.scheme).datagram:
            check_datagrams_reach(cfg.target, cfg.timeout)
        else:
            connect(cfg.target, cfg.timeout, cfg.tls).close()
    except Unreachable as exc:
        raise ToolError(f"unreachable: {exc}", UNREACHABLE) from None


def run(cfg: BenchConfig, outputs: output.Outputs, objectives: tuple[Objective, ...] = ()) -> int:
    """The run, shown and written; the exit code (exits.py): 1 on errors or mismatches, 3
    when it was clean but an objective was missed."""
    check_reachable(cfg)
    if kind(cfg.target.scheme).tls and (cfg.mode != "pingpong" or not native_pingpong(cfg)):
        why = (  # said once: the reader weighs the figures by it
            f"--mode {cfg.mode} has no C loop"
            if cfg.mode != "pingpong"
            else "the C loop was built without OpenSSL, or extensions are off"
        )
        print(
            f"bench over tls:// runs in the Python loop ({why}): watch 'client CPU' and the "
            "saturation warning",
            file=sys.stderr,
        )
    unit = "bytes" if cfg.mode == "stream" else "requests"
    progress = output.Progress(cfg.duration + cfg.warmup, unit)
    try:
        results = workers.run_workers(cfg, progress)
    finally:
        progress.stop()
    result = statistics.summarize(cfg, results)
    return verdict(result, outputs, objectives)


def verdict(
    result: BenchResult,
    outputs: output.Outputs,
    objectives: tuple[Objective, ...],
    note: str | None = None,
    comparison: Comparison | None = None,
    segments: Sequence[tuple[str, BenchResult]] = (),
) -> int:
    """A result (a run's or a merge's) shown and written with its objectives judged (and
    report's A/B comparison); the exit code bench and report share."""
    verdicts = [(o.judge(result, segments), slo.unit_of(o)) for o in objectives]
    try:
        output.show(result, outputs, note, verdicts, comparison)
    except OSError as exc:
        raise ToolError(f"cannot write results: {exc.strerror or exc}") from None
    if result.failed:
        return FAILED
    return SLO_MISSED if any(not v.passed for v, _ in verdicts) else OK
