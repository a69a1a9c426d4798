"""What one bench run is and what each load worker brings back: the model the load workers
(load.py, secure.py), the orchestration (workers.py, run.py) and the statistics share. A leaf
of bench/: it imports none of them (the defaults are tools/defaults.py's)."""

from __future__ import annotations

import dataclasses
import resource
import time
from collections import Counter

from socket_echo.config import DEFAULT_QUIC_ALPN, ConfigError
from socket_echo.kinds import DTLS, QUIC, STREAM, UDP, kind
from socket_echo.tools.connect.target import Target, TlsOptions
from socket_echo.tools.defaults import (
    ARRIVALS,
    DEFAULT_CONNECTIONS,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_DURATION,
    DEFAULT_IN_FLIGHT,
    DEFAULT_SIZE,
    DEFAULT_STREAM_SIZE,
    DEFAULT_TIMEOUT,
    LATE_SEND_US,
    MAX_IN_FLIGHT,
    MAX_SIZE,
)

# bench's modes by how the target is served (kinds.py's served_by): the one table cli.py,
# this model and the workers read. tls:// has none yet (probe and client speak it).
MODES_BY_KIND: dict[str, tuple[str, ...]] = {
    STREAM: ("pingpong", "stream", "churn"),
    UDP: ("udp",),
    QUIC: ("pingpong", "stream", "churn"),
    DTLS: ("pingpong", "churn"),
}
PROBE_RATE_SCHEMES = ("tcp", "unix")  # --probe-rate beside --mode stream
MAX_UDP_SIZE = 65507  # the largest IPv4 datagram's payload
DTLS_MAX_RECORD = 16384  # the largest DTLS plaintext record


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One bench run, built by keyword and checked in itself (uvicorn's Config: flags become a
    config that resolves its own rules once): ConfigError, one line, for a run that cannot be.
    ``size`` 0 takes the mode's default; a udp:// target runs ``--mode udp``."""

    target: Target
    mode: str = "pingpong"
    connections: int = DEFAULT_CONNECTIONS  # of the whole run (every segment together)
    size: int = 0  # 0: the mode's own (DEFAULT_SIZE; DEFAULT_STREAM_SIZE for stream)
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
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT  # the end: what is owed is read this long
    expect_responders: int = 0  # a group: the next datagram once this many answered (0: all)
    tls_resume: bool = False  # churn over tls://: offer the last session (resumption)

    def __post_init__(self) -> None:
        served = kind(self.target.scheme)
        mode = "udp" if served.served_by == UDP else self.mode
        modes = MODES_BY_KIND[served.served_by]
        if mode not in modes:
            raise ConfigError(f"--mode {mode} over {self.target.scheme}://: use {', '.join(modes)}")
        size = self.size or (DEFAULT_STREAM_SIZE if mode == "stream" else DEFAULT_SIZE)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "size", size)
        self._check_sizes(served.served_by, size)
        self._check_rates(mode)
        index, count = self.segment
        if not 0 <= index < count:
            raise ConfigError(f"--segment {index}/{count}: give I/N with 0 <= I < N")
        if count > self.connections:
            raise ConfigError(
                f"--segment {index}/{count}: {self.connections} connections cannot be divided "
                f"into {count} segments (each needs one)"
            )
        if self.tls_resume and not (served.tls and mode == "churn"):
            raise ConfigError("--tls-resume is for --mode churn over tls://")
        if self.expect_responders and self.target.group is None:
            raise ConfigError("--expect-responders is for a multicast group target")
        if not 1 <= self.in_flight <= MAX_IN_FLIGHT:
            raise ConfigError(f"--in-flight {self.in_flight}: 1 to {MAX_IN_FLIGHT}")
        if self.arrival not in ARRIVALS:
            raise ConfigError(f"--arrival {self.arrival}: use {', '.join(ARRIVALS)}")

    def _check_sizes(self, served_by: str, size: int) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise ConfigError(f"--size {size}: 1 to {MAX_SIZE}")
        if served_by == UDP and size > MAX_UDP_SIZE:
            raise ConfigError(
                f"--size is at most {MAX_UDP_SIZE} for UDP (the largest IPv4 datagram)"
            )
        if served_by == DTLS and size > DTLS_MAX_RECORD:
            raise ConfigError(f"--size is at most {DTLS_MAX_RECORD} for DTLS (one record)")

    def _check_rates(self, mode: str) -> None:
        # every kind's ping-pong has an open loop, and a multicast group's datagrams
        if self.rate and mode != "pingpong" and self.target.group is None:
            raise ConfigError(f"--rate is the open loop of --mode pingpong, not of {mode}")
        if self.probe_rate and (mode != "stream" or self.target.scheme not in PROBE_RATE_SCHEMES):
            raise ConfigError(
                "--probe-rate measures latency under --mode stream over tcp:// or unix://"
            )
        for flag, per_second in (("--rate", self.rate), ("--probe-rate", self.probe_rate)):
            if per_second and per_second * self.duration < 1:
                raise ConfigError(
                    f"{flag} {per_second:g} over --duration {self.duration:g} s makes no request "
                    "(at least one a run)"
                )

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


class ResponderCounts:
    """One member of a multicast group as one worker saw it (datagrams.GroupDatagrams)."""

    def __init__(self, t: float) -> None:
        self.answered = 0
        self.expected = 0  # datagrams sent in the window since it first answered (in flight: not)
        self.duplicates = 0
        self.reordered = 0  # answers that came after its answer to a later datagram
        self.first_t = t  # s into the window of its first answer, and of its last
        self.last_t = t
        self.latency_us: Counter[int] = Counter()


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
    # per connection (a slot of --connections, its replacements included), in the window
    answers: list[int] = dataclasses.field(default_factory=list)
    first_answer: list[float] = dataclasses.field(default_factory=list)  # s into it; -1: none
    replacements: int = 0  # connections opened in place of ones that failed
    retransmits: int = 0  # segments the kernel retransmitted (TCP_INFO, the open connections')
    kernel_rtt_us: list[int] = dataclasses.field(default_factory=list)  # smoothed, per one
    ended_gracefully: int = 0  # connections ended with FIN both ways after their echo
    resets_sent: int = 0  # ... ended with a reset: the peer had not closed within the drain
    drained_bytes: int = 0  # echo read after the window, while ending (in no figure)
    responders: dict[str, ResponderCounts] = dataclasses.field(default_factory=dict)  # a group
    late_send_threshold_us: int = LATE_SEND_US  # the open loop's "late" (coarser in asyncio)
    tls_handshakes: int = 0  # churn over tls://: handshakes made in the window ...
    tls_resumed: int = 0  # ... of which the server resumed a session (--tls-resume)
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

    def slots(self, n: int) -> None:
        """``n`` connections are counted apart (answers, first answer)."""
        self.answers = [0] * n
        self.first_answer = [-1.0] * n

    def record(self, us: int, t: float, slot: int = -1) -> None:
        """One answer ``us`` microseconds after its send (or its slot), at ``t``, on
        connection ``slot`` (-1: not counted apart): counted unless it came in the warm-up."""
        if t < self.mono_start:
            return
        if slot >= 0:
            if not self.answers[slot]:
                self.first_answer[slot] = t - self.mono_start
            self.answers[slot] += 1
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
