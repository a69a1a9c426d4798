"""What one bench run is and what each load worker brings back: the model bench.py and
bench_secure.py share (a leaf: it imports neither)."""

from __future__ import annotations

import dataclasses
import resource
from collections import Counter

from socket_echo.config import DEFAULT_QUIC_ALPN
from socket_echo.tools.target import Target, TlsOptions


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    target: Target
    mode: str = "pingpong"
    connections: int = 50
    size: int = 64
    duration: float = 10.0
    processes: int = 1
    rate: float = 0.0  # requests/s over all connections; 0 = closed loop
    timeout: float = 5.0
    tls: TlsOptions | None = None  # quic://, dtls://: --ca, --insecure
    alpn: str = DEFAULT_QUIC_ALPN[0]  # quic://


@dataclasses.dataclass
class WorkerResult:
    requests: int = 0
    bytes: int = 0
    mismatches: int = 0
    lost: int = 0
    duplicates: int = 0  # UDP: a second answer to a datagram already answered
    late: int = 0  # UDP: an answer that came after its datagram was counted lost
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    latency_us: Counter[int] = dataclasses.field(default_factory=Counter)
    cpu_seconds: float = 0.0
    elapsed: float = 0.0


def cpu_seconds() -> float:
    """CPU time this process has used, user and system, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
