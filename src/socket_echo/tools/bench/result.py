"""What a bench run (or report's sum of runs) found: one typed model that ``--json``, the text
table, ``report``, the plot and ``.hgrm`` all read. Made by statistics.summarize (a run) and
merge.merge (runs added), read back from a file by result_file.load; written by
:meth:`BenchResult.to_json`, the format docs/bench-json.md documents (its ``format`` field
names the version: a reader refuses any other).

Histograms are kept as the JSON carries them, HdrHistogram V2 text (base64): adding them is
exact, so a merge is one run, not an average of percentiles. ``decoded()`` gives the latency
histogram itself (the plot and ``.hgrm`` read it).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from hdrh.histogram import HdrHistogram

FORMAT = "socket-echo bench 2"  # the JSON's "format": what report reads
LOWEST_US, HIGHEST_US, DIGITS = 1, 3_600_000_000, 3  # every histogram's range and precision
PERCENTILES = {
    "p50": 50.0, "p75": 75.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9,
    "p9999": 99.99, "p99999": 99.999,
}  # fmt: skip


class ResultError(ValueError):
    """A results file report cannot read, or results that cannot be added; one line."""


def iterate(hist: HdrHistogram) -> list[tuple[int, int]]:
    """(value, count) of every recorded bucket, as hdrh's recorded iterator gives them (each
    bucket's highest equivalent value) but from the counts array at once: the iterator steps
    through every bucket below the largest value in Python (10x slower; report --compare
    reads one histogram per second of every run)."""
    return [
        (int(hist.get_highest_equivalent_value(hist.get_value_from_index(i))), int(n))
        for i, n in enumerate(list(hist.counts))
        if n
    ]


# the result's whole-number counters: what a reader checks and a merge sums, field for field
COUNTED = (
    "requests", "errors", "mismatches", "lost_datagrams", "late_datagrams",
    "duplicate_datagrams", "sends", "late_sends", "held_sends", "ended_gracefully",
    "resets_sent", "drained_bytes", "tls_handshakes", "tls_resumed",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """p50 ... p99.999, max, min (us) and the mean of a histogram; None when it is empty."""

    p50: int | None = None
    p75: int | None = None
    p90: int | None = None
    p95: int | None = None
    p99: int | None = None
    p999: int | None = None
    p9999: int | None = None
    p99999: int | None = None
    max: int | None = None
    min: int | None = None
    mean: float | None = None

    @classmethod
    def of(cls, hist: HdrHistogram) -> Spectrum:
        """hdrh's get_value_at_percentile and get_mean_value, figure for figure, from one
        pass over the recorded buckets: hdrh walks its counts in Python once per percentile
        and steps its slow iterator for the mean (most of a short bench run's own CPU)."""
        total = hist.get_total_count()
        if not total:
            return cls()
        targets = sorted(
            (hist.get_target_count_at_percentile(p), k) for k, p in PERCENTILES.items()
        )
        values: dict[str, int] = {}
        seen, at, weighted = 0, 0, 0
        for value, n in iterate(hist):  # value: its bucket's highest equivalent value
            seen += n
            lowest = hist.get_lowest_equivalent_value(value)
            weighted += n * (lowest + ((value - lowest + 1) >> 1))  # the bucket's median
            while at < len(targets) and seen >= targets[at][0]:
                values[targets[at][1]] = value
                at += 1
        return cls(
            **values,
            max=int(hist.get_max_value()),
            min=int(hist.get_min_value()),
            mean=round(float(weighted) / total, 1),
        )

    def __getitem__(self, key: str) -> int | float | None:
        value: int | float | None = getattr(self, key)
        return value


@dataclasses.dataclass(frozen=True)
class Window:
    start: float  # Unix seconds the measured window began
    seconds: float

    @property
    def end(self) -> float:
        return self.start + self.seconds


@dataclasses.dataclass(frozen=True)
class Segment:
    index: int | None  # None: a merge
    count: int
    merged: tuple[int, ...] | None = None  # a merge: the indices it added


@dataclasses.dataclass(frozen=True)
class Parameters:
    connections: int
    size: int
    duration: float
    processes: int = 1
    rate: float | None = None  # the open loop's requests/s of the whole run
    timeout: float | None = None
    arrival: str | None = None
    warmup: float = 0.0
    in_flight: int = 1
    start_at: float | None = None
    segment: str = "0/1"
    drain_timeout: float = 0.0


@dataclasses.dataclass(frozen=True)
class Second:
    t: float  # Unix time the second starts
    requests: int
    histogram: str


@dataclasses.dataclass(frozen=True)
class Flow:
    """The latency-under-load flow of a stream run (``under_load``)."""

    rate: float
    size: int
    requests: int
    errors: int
    mismatches: int
    latency_us: Spectrum
    latency_uncorrected_us: Spectrum
    histogram: str
    histogram_uncorrected: str


@dataclasses.dataclass(frozen=True)
class PerConnection:
    """Each connection's share (a slot of --connections: a replacement counts in the slot of
    the one it replaced), so a peer that serves one client at a time, or starves some, shows:
    answers in the window, and when the first came (seconds into it, -1: never)."""

    answers: tuple[int, ...] = ()
    first_answer_s: tuple[float, ...] = ()
    replacements: int = 0

    @property
    def never_answered(self) -> int:
        return sum(1 for n in self.answers if n == 0)

    @property
    def fairness(self) -> float | None:
        """Jain's index: 1 when every connection got as many answers, 1/n when one got all."""
        total, squares = sum(self.answers), sum(n * n for n in self.answers)
        return round(total * total / (len(self.answers) * squares), 4) if squares else None

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.answers)
        firsts = sorted(f for f in self.first_answer_s if f >= 0)
        return {
            "connections": len(ordered),
            "never_answered": self.never_answered,
            "replacements": self.replacements,
            "min": ordered[0] if ordered else None,
            "median": ordered[len(ordered) // 2] if ordered else None,
            "max": ordered[-1] if ordered else None,
            "fairness": self.fairness,
            "first_answer_median_s": firsts[len(firsts) // 2] if firsts else None,
            "first_answer_max_s": firsts[-1] if firsts else None,
        }


@dataclasses.dataclass(frozen=True)
class Transport:
    """What the kernel saw of the peer's stack (TCP_INFO on bench's own sockets, read at the
    end of the window): segments retransmitted, and each connection's smoothed RTT."""

    retransmitted_segments: int = 0
    kernel_rtt_us: tuple[int, ...] = ()

    def summary(self, megabytes: float) -> dict[str, Any]:
        rtts = sorted(self.kernel_rtt_us)

        def at(q: float) -> int | None:
            return rtts[min(len(rtts) - 1, int(q * len(rtts)))] if rtts else None

        return {
            "retransmitted_segments": self.retransmitted_segments,
            "retransmitted_per_mb": (
                round(self.retransmitted_segments / megabytes, 3) if megabytes else None
            ),
            "connections_sampled": len(rtts),
            "kernel_rtt_p50_us": at(0.5),
            "kernel_rtt_p90_us": at(0.9),
            "kernel_rtt_max_us": rtts[-1] if rtts else None,
        }


@dataclasses.dataclass(frozen=True)
class Responder:
    """One member of a multicast group as bench saw it answer (bench to a group target)."""

    address: str
    answered: int
    lost: int  # datagrams sent since its first answer that it never answered
    duplicates: int
    reordered: int  # answers that came after its answer to a later datagram
    first_s: float  # s into the window of its first answer ...
    last_s: float  # ... and of its last: a member that went silent stops early
    latency_us: Spectrum
    histogram: str


@dataclasses.dataclass(frozen=True)
class BenchResult:
    target: str
    mode: str
    requests: int
    requests_per_second: float
    megabytes_per_second: float
    latency_from: str  # "send", or "intended send time (corrected)" (the open loop)
    latency_us: Spectrum
    latency_uncorrected_us: Spectrum | None  # the open loop's, from the actual send
    send_lateness_us: Spectrum | None  # the open loop's: how late each send left its slot
    generator_behind: bool
    histogram: str
    histogram_uncorrected: str | None
    histogram_lateness: str | None
    errors: int
    error_kinds: dict[str, int]
    mismatches: int
    lost_datagrams: int
    late_datagrams: int
    duplicate_datagrams: int
    sends: int
    late_sends: int
    held_sends: int
    late_send_threshold_us: int
    per_connection: PerConnection
    transport: Transport
    ended_gracefully: int  # connections ended with FIN both ways, after their echo
    resets_sent: int  # ... ended with a reset: the peer had not closed within the drain
    drained_bytes: int  # echo read while ending, after the window (in no figure)
    client_cpu_percent: float  # per load process
    client_spin_percent: float  # of that, polling for the next slot
    client_saturated: bool
    window: Window
    segment: Segment
    parameters: Parameters
    per_second: tuple[Second, ...]
    loss_explanation: str | None
    under_load: Flow | None
    responders: tuple[Responder, ...] = ()  # a multicast group's members, by address
    tls_handshakes: int = 0  # churn over tls://: full or resumed handshakes in the window
    tls_resumed: int = 0  # ... of which the server resumed the session offered

    @property
    def failed(self) -> bool:
        """Errors or mismatches, in the load or in the flow beside it: bench and report exit
        1 (the exit-code table)."""
        flow = self.under_load
        return bool(self.errors or self.mismatches or (flow and (flow.errors or flow.mismatches)))

    def decoded(self) -> HdrHistogram:
        """The latency histogram (corrected, in the open loop)."""
        return HdrHistogram.decode(self.histogram.encode("ascii"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON's object: docs/bench-json.md, field for field."""
        out: dict[str, Any] = {"format": FORMAT}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "latency_uncorrected_us":
                out["latency_uncorrected_us"] = _plain(value)
                out["latency_resolution_us"] = 1
                out["latency_significant_digits"] = DIGITS
            elif field.name == "window":
                out["window"] = {"start": value.start, "end": value.end, "seconds": value.seconds}
            elif field.name == "per_connection":
                out["per_connection"] = {
                    **value.summary(),
                    "answers": list(value.answers),
                    "first_answer_s": list(value.first_answer_s),
                }
            elif field.name == "transport":
                megabytes = self.megabytes_per_second * self.window.seconds
                out["transport"] = {
                    **value.summary(megabytes),
                    "kernel_rtt_us": list(value.kernel_rtt_us),
                }
            elif field.name == "segment":
                out["segment"] = {"index": value.index, "count": value.count}
                if value.merged is not None:
                    out["segment"]["merged"] = list(value.merged)
            else:
                out[field.name] = _plain(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
