"""``socket-echo bench``: one run, from its config to its exit code (uvicorn's shape: flags ->
a config that checks itself -> ``run(config) -> exit code``). Reachable first (one line, exit 2,
when it is not: a wrong port or certificate is said once, not counted for the whole run), then
the workers (workers.py), the result (statistics.py), its outputs (output.py)."""

from __future__ import annotations

from socket_echo.exits import FAILED, OK, UNREACHABLE, ToolError
from socket_echo.kinds import DTLS, QUIC, kind
from socket_echo.tools.bench import output, statistics, workers
from socket_echo.tools.bench.model import BenchConfig
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
            connect(cfg.target, cfg.timeout).close()
    except Unreachable as exc:
        raise ToolError(f"unreachable: {exc}", UNREACHABLE) from None


def run(cfg: BenchConfig, outputs: output.Outputs) -> int:
    """The run, shown and written; the exit code (exits.py): 1 on errors or mismatches."""
    check_reachable(cfg)
    unit = "bytes" if cfg.mode == "stream" else "requests"
    progress = output.Progress(cfg.duration + cfg.warmup, unit)
    try:
        results = workers.run_workers(cfg, progress)
    finally:
        progress.stop()
    result = statistics.summarize(cfg, results)
    try:
        output.show(result, outputs)
    except OSError as exc:
        raise ToolError(f"cannot write results: {exc.strerror or exc}") from None
    return FAILED if result.failed else OK
