"""bench's figures: the workers' counts made into one run's result (result.BenchResult), and
the histogram arithmetic the run and report's merge share.

Latency is kept as HdrHistogram keeps it (1 us to an hour, 3 significant digits: exact to the
microsecond below 1 ms, within 0.1 % above), and the result carries the histograms themselves,
HdrHistogram V2-encoded (base64), for the whole window and for each second of it: adding
histograms is exact, so N segments merged are one run, not an average of percentiles.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

from socket_echo.groups import address_key
from socket_echo.tools.bench.errors import NEVER_ANSWERED, NO_REQUEST
from socket_echo.tools.bench.histograms import encode, histogram, iterate
from socket_echo.tools.bench.model import BenchConfig, ResponderCounts, WorkerResult
from socket_echo.tools.bench.result import (
    BenchResult,
    Flow,
    Parameters,
    PerConnection,
    Responder,
    Second,
    Segment,
    Spectrum,
    Transport,
    Window,
)
from socket_echo.tools.defaults import BEHIND_SHARE, BEHIND_US, LATE_SEND_US

SATURATED = 0.90  # a worker busier than this measured itself, not the server


def behind_us(late_send_threshold_us: int) -> int:
    """How late a send must leave to count as the generator falling behind: BEHIND_US, or the
    loop's own grain where that is coarser (asyncio's, for QUIC and DTLS)."""
    return max(BEHIND_US, late_send_threshold_us)


def behind(lateness: HdrHistogram, sends: int, threshold_us: int = BEHIND_US) -> bool:
    """Whether the generator fell behind its schedule: over BEHIND_SHARE of the sends left
    ``threshold_us`` or more after their slot (a few microseconds late is the machine's noise
    and is counted in late_sends; this is the one that moves the figures)."""
    if not sends:
        return False
    above = sum(n for value, n in iterate(lateness) if value >= threshold_us)
    return above > BEHIND_SHARE * sends


def latency_fields(
    corrected: HdrHistogram,
    uncorrected: HdrHistogram | None,
    lateness: HdrHistogram | None,
    sends: int,
    behind_threshold_us: int = BEHIND_US,
) -> dict[str, Any]:
    """The latency fields of a result, a run's or a merge's (``uncorrected`` and ``lateness``
    are the open loop's, None for a closed loop)."""
    return {
        "latency_us": Spectrum.of(corrected),
        "latency_uncorrected_us": Spectrum.of(uncorrected) if uncorrected else None,
        "send_lateness_us": Spectrum.of(lateness) if lateness else None,
        "generator_behind": behind(lateness, sends, behind_threshold_us) if lateness else False,
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected) if uncorrected else None,
        "histogram_lateness": encode(lateness) if lateness else None,
    }


def flow(
    rate: float, size: int, requests: int, errors: int, mismatches: int,
    corrected: HdrHistogram, uncorrected: HdrHistogram,
) -> Flow:  # fmt: skip
    """The latency-under-load flow's figures (``under_load``), a run's or a merge's."""
    return Flow(
        rate=rate,
        size=size,
        requests=requests,
        errors=errors,
        mismatches=mismatches,
        latency_us=Spectrum.of(corrected),
        latency_uncorrected_us=Spectrum.of(uncorrected),
        histogram=encode(corrected),
        histogram_uncorrected=encode(uncorrected),
    )


def group_members(results: list[WorkerResult]) -> tuple[Responder, ...]:
    """A group's members, each worker's counts added by address, in address order."""
    by: dict[str, list[ResponderCounts]] = {}
    for r in results:
        for address, counts in r.responders.items():
            by.setdefault(address, []).append(counts)
    members = []
    for address, parts in by.items():
        latency: Counter[int] = Counter()
        for part in parts:
            latency.update(part.latency_us)
        hist = histogram(latency)
        answered = sum(p.answered for p in parts)
        members.append(
            Responder(
                address=address,
                answered=answered,
                lost=max(0, sum(p.expected for p in parts) - answered),
                duplicates=sum(p.duplicates for p in parts),
                reordered=sum(p.reordered for p in parts),
                first_s=round(max(0.0, min(p.first_t for p in parts)), 6),
                last_s=round(max(0.0, max(p.last_t for p in parts)), 6),
                latency_us=Spectrum.of(hist),
                histogram=encode(hist),
            )
        )
    return tuple(sorted(members, key=lambda m: address_key(m.address)))


def summarize(cfg: BenchConfig, results: list[WorkerResult]) -> BenchResult:
    """One run's result, from what each worker process brought back."""
    from socket_echo.tools.bench.losses import explain_losses

    probes = [r for r in results if r.probe]
    results = [r for r in results if not r.probe]
    corrected = histogram()
    uncorrected = histogram()
    lateness: Counter[int] = Counter()
    seconds: list[Counter[int]] = []
    errors: Counter[str] = Counter()
    for r in results:
        corrected.add(histogram(r.latency_us))
        uncorrected.add(histogram(r.uncorrected_us))
        lateness.update(r.lateness_us)
        for i, second in enumerate(r.per_second):
            while len(seconds) <= i:
                seconds.append(Counter())
            seconds[i].update(second)
        errors.update(r.errors)
    per_connection = PerConnection(
        answers=tuple(n for r in results for n in r.answers),
        first_answer_s=tuple(round(f, 6) for r in results for f in r.first_answer),
        replacements=sum(r.replacements for r in results),
    )
    if per_connection.never_answered:
        errors[NEVER_ANSWERED] += per_connection.never_answered
    measured = [r for r in results if r.measured_from]
    start = min((r.measured_from for r in measured), default=0.0)
    elapsed = max((r.elapsed for r in results), default=0.0) or 1e-9
    requests = sum(r.requests for r in results)
    if requests == 0 and not errors:
        errors[NO_REQUEST] += 1
    cpu = sum(r.cpu_seconds for r in results)
    spun = sum(r.spun_seconds for r in results)
    busiest = max(
        ((r.cpu_seconds - r.spun_seconds) / r.elapsed for r in results if r.elapsed), default=0.0
    )  # polling for the next slot is CPU kept on purpose, not load
    sends = sum(r.sends for r in results)
    threshold = max((r.late_send_threshold_us for r in results), default=LATE_SEND_US)
    responders = group_members(results)
    lost = sum(r.lost for r in results) + sum(m.lost for m in responders)
    connections, rate = cfg.share
    open_loop = bool(cfg.rate)  # BenchConfig allows it for ping-pong and a group only
    processes = max(1, len(results))
    return BenchResult(
        target=cfg.target.url,
        mode=cfg.mode,
        requests=requests,
        requests_per_second=requests / elapsed,
        megabytes_per_second=sum(r.bytes for r in results) / elapsed / 1e6,
        latency_from="intended send time (corrected)" if open_loop else "send",
        **latency_fields(
            corrected,
            uncorrected if open_loop else None,
            histogram(lateness) if open_loop else None,
            sends,
            behind_us(threshold),
        ),
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        mismatches=sum(r.mismatches for r in results),
        lost_datagrams=lost,
        late_datagrams=sum(r.late for r in results),
        duplicate_datagrams=sum(r.duplicates for r in results),
        sends=sends,
        late_sends=sum(r.late_sends for r in results),
        held_sends=sum(r.held_sends for r in results),
        late_send_threshold_us=threshold,
        per_connection=per_connection,
        transport=Transport(
            retransmitted_segments=sum(r.retransmits for r in results),
            kernel_rtt_us=tuple(us for r in results for us in r.kernel_rtt_us),
        ),
        ended_gracefully=sum(r.ended_gracefully for r in results + probes),
        resets_sent=sum(r.resets_sent for r in results + probes),
        drained_bytes=sum(r.drained_bytes for r in results + probes),
        client_cpu_percent=100 * cpu / elapsed / processes,
        client_spin_percent=100 * spun / elapsed / processes,
        client_saturated=busiest >= SATURATED,
        window=Window(start, elapsed),
        segment=Segment(cfg.segment[0], cfg.segment[1]),
        parameters=Parameters(
            connections=connections,
            size=cfg.size,
            duration=cfg.duration,
            processes=cfg.processes,
            rate=rate or None,
            timeout=cfg.timeout,
            arrival=cfg.arrival if open_loop else None,
            warmup=cfg.warmup,
            in_flight=cfg.in_flight if open_loop else 1,
            start_at=cfg.start_at,
            segment=f"{cfg.segment[0]}/{cfg.segment[1]}",
            drain_timeout=cfg.drain_timeout,
        ),
        per_second=tuple(
            Second(start + i, sum(s.values()), encode(histogram(s))) for i, s in enumerate(seconds)
        ),
        loss_explanation=explain_losses(cfg, requests, lost, elapsed),
        under_load=under_load(cfg, probes) if cfg.probe_rate else None,
        responders=responders,
        tls_handshakes=sum(r.tls_handshakes for r in results),
        tls_resumed=sum(r.tls_resumed for r in results),
    )


def under_load(cfg: BenchConfig, probes: list[WorkerResult]) -> Flow:
    """The ping-pong flow measured while the load ran (iperf2's --bounceback-congest)."""
    corrected, uncorrected = histogram(), histogram()
    for r in probes:
        corrected.add(histogram(r.latency_us))
        uncorrected.add(histogram(r.uncorrected_us))
    return flow(
        cfg.probe_rate,
        cfg.probe().size,
        sum(r.requests for r in probes),
        sum(sum(r.errors.values()) for r in probes),
        sum(r.mismatches for r in probes),
        corrected,
        uncorrected,
    )
