"""Results added (``socket-echo report``): histograms added, counters and rates summed, the
window the common one; the sum is a BenchResult like a run's, every field filled."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from typing import Any

from socket_echo.groups import address_key
from socket_echo.tools.bench.histograms import add_encoded, encode, histogram
from socket_echo.tools.bench.result import (
    COUNTED,
    BenchResult,
    Flow,
    PerConnection,
    Responder,
    ResultError,
    Second,
    Segment,
    Spectrum,
    Transport,
    Window,
)
from socket_echo.tools.bench.statistics import behind_us, flow, latency_fields
from socket_echo.tools.defaults import LATE_SEND_US

SAME = ("target", "mode")  # results of different targets, modes or sizes do not add


def merge(results: list[tuple[str, BenchResult]]) -> BenchResult:
    """(path, result) pairs added. ResultError when they are not of one target, mode, size
    and division into segments, or one segment comes twice.

    Memory: one decoded histogram per figure, plus one at a time for the seconds (each
    second's histograms decoded, added, encoded and dropped in turn); the files' encoded text
    is all that stays (merging four one-hour results: README's figures)."""
    first_path, first = results[0]
    for path, r in results[1:]:
        for key in SAME:
            if getattr(r, key) != getattr(first, key):
                raise ResultError(
                    f"{path}: {key} {getattr(r, key)!r}, not {getattr(first, key)!r} as in "
                    f"{first_path}: results of different runs do not add"
                )
        if r.parameters.size != first.parameters.size:
            raise ResultError(
                f"{path}: size {r.parameters.size}, not {first.parameters.size} as in {first_path}"
            )
        if r.segment.count != first.segment.count:
            raise ResultError(
                f"{path}: segment {r.segment.index}/{r.segment.count}, of another division than "
                f"{first_path}'s {first.segment.index}/{first.segment.count}"
            )
    seen: dict[int | None, str] = {}
    for path, r in results:
        if r.segment.index in seen and r.segment.count > 1:
            raise ResultError(
                f"{path}: segment {r.segment.index}/{r.segment.count} is also "
                f"{seen[r.segment.index]}"
            )
        seen[r.segment.index] = path
    corrected, uncorrected, lateness = histogram(), histogram(), histogram()
    open_loop = False
    seconds: defaultdict[int, list[Second]] = defaultdict(list)
    errors: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for path, r in results:
        add_encoded(corrected, r.histogram, f"{path}: histogram")
        if r.histogram_uncorrected:
            open_loop = True
            add_encoded(uncorrected, r.histogram_uncorrected, f"{path}: histogram_uncorrected")
        if r.histogram_lateness:
            add_encoded(lateness, r.histogram_lateness, f"{path}: histogram_lateness")
        for s in r.per_second:
            seconds[round(s.t)].append(s)
        counts.update({key: getattr(r, key) for key in COUNTED})
        errors.update(r.error_kinds)
    start = max(r.window.start for _, r in results)
    end = min(r.window.end for _, r in results)
    rates = [r.parameters.rate for _, r in results]
    every = [r for _, r in results]
    return BenchResult(
        target=first.target,
        mode=first.mode,
        requests_per_second=sum(r.requests_per_second for r in every),
        megabytes_per_second=sum(r.megabytes_per_second for r in every),
        **summed(counts),
        latency_from=first.latency_from,
        **latency_fields(
            corrected,
            uncorrected if open_loop else None,
            lateness if open_loop else None,
            counts["sends"],
            behind_us(first.late_send_threshold_us or LATE_SEND_US),
        ),
        error_kinds=dict(errors),
        late_send_threshold_us=first.late_send_threshold_us or LATE_SEND_US,
        per_connection=PerConnection(
            answers=tuple(n for r in every for n in r.per_connection.answers),
            first_answer_s=tuple(f for r in every for f in r.per_connection.first_answer_s),
            replacements=sum(r.per_connection.replacements for r in every),
        ),
        transport=Transport(
            retransmitted_segments=sum(r.transport.retransmitted_segments for r in every),
            kernel_rtt_us=tuple(us for r in every for us in r.transport.kernel_rtt_us),
        ),
        client_cpu_percent=max(r.client_cpu_percent for r in every),  # per process
        client_spin_percent=max(r.client_spin_percent for r in every),
        client_saturated=any(r.client_saturated for r in every),
        window=Window(start, max(0.0, end - start)),
        segment=Segment(None, first.segment.count, tuple(sorted(i for i in seen if i is not None))),
        parameters=dataclasses.replace(
            first.parameters,
            connections=sum(r.parameters.connections for r in every),
            processes=sum(r.parameters.processes for r in every),
            rate=sum(r for r in rates if r) if all(rates) else None,
            segment=",".join(sorted(r.parameters.segment for r in every)),
        ),
        per_second=tuple(merge_second(t, seconds.pop(t)) for t in sorted(seconds)),
        loss_explanation=None,
        under_load=merge_flows([(p, r.under_load) for p, r in results if r.under_load]),
        responders=merge_responders(results),
    )


def merge_responders(results: list[tuple[str, BenchResult]]) -> tuple[Responder, ...]:
    """A group's members over every segment: counts added, histograms added, by address (a
    member seen by one segment only is that segment's)."""
    by: dict[str, list[tuple[str, Responder]]] = {}
    for path, r in results:
        for member in r.responders:
            by.setdefault(member.address, []).append((path, member))
    merged = []
    for address, parts in by.items():
        hist = histogram()
        for path, m in parts:
            add_encoded(hist, m.histogram, f"{path}: responder {address}")
        merged.append(
            Responder(
                address=address,
                answered=sum(m.answered for _, m in parts),
                lost=sum(m.lost for _, m in parts),
                duplicates=sum(m.duplicates for _, m in parts),
                reordered=sum(m.reordered for _, m in parts),
                first_s=min(m.first_s for _, m in parts),
                last_s=max(m.last_s for _, m in parts),
                latency_us=Spectrum.of(hist),
                histogram=encode(hist),
            )
        )
    return tuple(sorted(merged, key=lambda m: address_key(m.address)))


def summed(counts: Counter[str]) -> dict[str, Any]:
    """The counters a result holds, each the sum over the results added."""
    return {key: counts[key] for key in COUNTED}


def merge_second(t: int, parts: list[Second]) -> Second:
    """One second of the merge: its histograms added into one, encoded, and let go."""
    hist = histogram()
    for s in parts:
        add_encoded(hist, s.histogram, f"per_second {t}")
    return Second(float(t), sum(s.requests for s in parts), encode(hist))


def merge_flows(flows: list[tuple[str, Flow]]) -> Flow | None:
    if not flows:
        return None
    corrected, uncorrected = histogram(), histogram()
    for path, f in flows:
        add_encoded(corrected, f.histogram, f"{path}: under_load.histogram")
        add_encoded(uncorrected, f.histogram_uncorrected, f"{path}: under_load")
    every = [f for _, f in flows]
    return flow(
        sum(f.rate for f in every),
        every[0].size,
        sum(f.requests for f in every),
        sum(f.errors for f in every),
        sum(f.mismatches for f in every),
        corrected,
        uncorrected,
    )


def coverage_note(merged: BenchResult) -> str | None:
    """What the merge lacks or where the windows differ, in one line (None: nothing)."""
    count = merged.segment.count
    have = list(merged.segment.merged or ())
    missing = count - len(have) if count > 1 else 0
    notes = []
    if missing:
        notes.append(f"{missing} of {count} segments are missing: {spans(have, count)}")
    seconds = merged.window.seconds
    duration = merged.parameters.duration
    if not math.isfinite(seconds) or seconds < 0.9 * duration:
        notes.append(
            f"the runs overlap for {max(0.0, seconds):.1f} s of {duration:g}"
            " (start them together: --start-at)"
        )
    return "; ".join(notes) or None


def spans(have: list[int], count: int, most: int = 8) -> str:
    """The indices in 0..count-1 not in ``have`` (sorted), as ranges, the first ``most`` of
    them: work in the number of results, not in the count a file claims."""
    out, prev = [], -1
    for i in [*have, count]:
        if i > prev + 1:
            lo, hi = prev + 1, i - 1
            out.append(str(lo) if lo == hi else f"{lo}-{hi}")
        prev = i
    more = f" and {len(out) - most} more ranges" if len(out) > most else ""
    return ", ".join(out[:most]) + more
