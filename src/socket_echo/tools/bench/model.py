"""What one bench run is and what each load worker brings back: the model the load workers
(load.py, bench_secure.py), the orchestration (bench.py) and the statistics (stats.py) share.
A leaf of tools/: it imports none of them (the defaults are tools/defaults.py's)."""

from __future__ import annotations

import dataclasses
import resource
import time
from collections import Counter

from socket_echo.config import DEFAULT_QUIC_ALPN
from socket_echo.tools.connect.target import Target, TlsOptions
from socket_echo.tools.defaults import (
    DEFAULT_CONNECTIONS,
    DEFAULT_DURATION,
    DEFAULT_IN_FLIGHT,
    DEFAULT_SIZE,
    DEFAULT_TIMEOUT,
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    target: Target
    mode: str = "pingpong"
    connections: int = DEFAULT_CONNECTIONS  # of the whole run (every segment together)
    size: int = DEFAULT_SIZE
    duration: float = DEFAULT_DURATION  # measured, after the warm-up
    processes: int = 1
    rate: float = 0.0  # requests/s of the whole run; 0 = closed loop
    timeout: float = DEFAULT_TIMEOUT
    tls: TlsOptions | None = None  # quic://, dtls://: --ca, --insecure
    alpn: str = DEFAULT_QUIC_ALPN[0]  # quic://
    arrival: str = "uniform"  # open loop: "uniform" or "poisson" gaps between requests
    warmup: float = 0.0  # seconds run first and left out of every figure
    in_flight: int = DEFAULT_IN_FLIGHT
    segment: tuple[int, int] = (0, 1)  # this run is segment I of N (bench --segment I/N)
    start_at: float | None = None  # wall-clock seconds every segment starts at
    probe_rate: float = 0.0  # stream: a ping-pong flow at this rate, measured under the load

    def probe(self) -> BenchConfig:
        """The latency-under-load flow: one connection, 64 B, open loop at ``probe_rate``."""
        return dataclasses.replace(
            self, mode="pingpong", size=DEFAULT_SIZE, connections=1, processes=1,
            rate=self.probe_rate, segment=(0, 1), probe_rate=0.0,
        )  # fmt: skip

    @property
    def share(self) -> tuple[int, float]:
        """(connections, rate) of this segment: the whole divided as k6's execution segments
        divide it, so the N segments sum to the whole exactly (30 over 4: 8, 8, 7, 7), and
        every connection has the same request rate wherever it runs."""
        index, count = self.segment
        connections = split(self.connections, count)[index]
        return connections, self.rate * connections / self.connections


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` as even as can be, the larger shares first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclasses.dataclass
class WorkerResult:
    requests: int = 0
    bytes: int = 0
    mismatches: int = 0
    lost: int = 0
    duplicates: int = 0  # UDP: a second answer to a datagram already answered
    late: int = 0  # UDP: an answer that came after its datagram was counted lost
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    uncorrected_us: Counter[int] = dataclasses.field(default_factory=Counter)  # open loop
    lateness_us: Counter[int] = dataclasses.field(default_factory=Counter)  # send - slot
    per_second: list[Counter[int]] = dataclasses.field(default_factory=list)  # us -> answers
    sends: int = 0  # open loop: requests sent in the window
    late_sends: int = 0  # ... that left over LATE_SEND_US after their slot with room to go
    held_sends: int = 0  # ... that waited because `in_flight` were unanswered (the server)
    measured_from: float = 0.0  # wall-clock seconds the window began
    mono_start: float = 0.0  # the same instant on the monotonic clock (this process's)
    probe: bool = False  # the latency-under-load flow's, not the load's
    cpu_seconds: float = 0.0
    spun_seconds: float = 0.0  # of cpu_seconds, polling for a slot to come (open loop)
    elapsed: float = 0.0

    def begin(self, mono_start: float) -> None:
        """The measured window begins at ``mono_start`` (time.monotonic's clock, which is
        CLOCK_MONOTONIC: the C loop's too)."""
        self.mono_start = mono_start
        self.measured_from = time.time() - (time.monotonic() - mono_start)

    @property
    def latency_us(self) -> Counter[int]:
        """The whole window's latencies: its seconds added (each answer counted once)."""
        whole: Counter[int] = Counter()
        for second in self.per_second:
            whole.update(second)
        return whole

    def record(self, us: int, t: float) -> None:
        """One answer ``us`` microseconds after its send (or its slot), at ``t``: counted
        unless it came in the warm-up."""
        if t < self.mono_start:
            return
        self.requests += 1
        second = int(t - self.mono_start)
        seconds = self.per_second
        while len(seconds) <= second:
            seconds.append(Counter())
        seconds[second][us] += 1


def cpu_seconds() -> float:
    """CPU time this process has used, user and system, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
