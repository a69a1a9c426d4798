"""bench's figures: the workers' counts made into one summary (the JSON ``--json`` writes and
the table shows), and summaries of several runs added into one (``socket-echo report``).

Latency is kept as HdrHistogram keeps it (1 us to an hour, 3 significant digits: exact to the
microsecond below 1 ms, within 0.1 % above), and the JSON carries the histograms themselves,
HdrHistogram V2-encoded (base64), for the whole window and for each second of it: adding
histograms is exact, so N segments merged are one run, not an average of percentiles.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from typing import Any

from hdrh.histogram import HdrHistogram

from socket_echo.tools.bench.model import BenchConfig, WorkerResult
from socket_echo.tools.bench.result_file import (
    COUNTS,
    DIGITS,
    FORMAT,
    HIGHEST_US,
    LOWEST_US,
    ResultError,
    ResultFile,
    Second,
    check_histogram,
)
from socket_echo.tools.defaults import BEHIND_SHARE, BEHIND_US, LATE_SEND_US

PERCENTILES = {
    "p50": 50.0, "p75": 75.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9,
    "p9999": 99.99, "p99999": 99.999,
}  # fmt: skip
SATURATED = 0.90  # a worker busier than this measured itself, not the server
__all__ = ["FORMAT", "ResultError"]  # re-exported: where the tools' callers look for them


def histogram(counts: Counter[int] | None = None) -> HdrHistogram:
    hist = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
    for us, n in (counts or {}).items():
        hist.record_value(min(max(LOWEST_US, us), HIGHEST_US), n)
    return hist


def encode(hist: HdrHistogram) -> str:
    return str(hist.encode().decode("ascii"))


def decode(text: object, where: str) -> HdrHistogram:
    """A V2 histogram of bench's range and precision (its header checked before anything is
    allocated from it: result_file.check_histogram); ResultError naming ``where`` otherwise."""
    if not isinstance(text, str):
        raise ResultError(f"{where}: not an HdrHistogram (a {type(text).__name__})")
    check_histogram(text, where)
    try:
        return HdrHistogram.decode(text.encode("ascii"))
    except Exception as exc:  # hdrh raises its own kinds (cookie, length) besides base64's
        raise ResultError(f"{where}: not an HdrHistogram ({exc or type(exc).__name__})") from None


def add_encoded(into: HdrHistogram, text: str, where: str) -> None:
    """Decode, add, drop: one decoded histogram alive at a time."""
    into.add(decode(text, where))


def spectrum(hist: HdrHistogram) -> dict[str, Any]:
    """p50 ... p99.999, max, min, mean in microseconds (None when nothing was measured)."""
    keys = [*PERCENTILES, "max", "min", "mean"]
    if not hist.get_total_count():
        return dict.fromkeys(keys, None)
    out: dict[str, Any] = {k: hist.get_value_at_percentile(p) for k, p in PERCENTILES.items()}
    out["max"] = hist.get_max_value()
    out["min"] = hist.get_min_value()
    out["mean"] = round(hist.get_mean_value(), 1)
    return out


def behind(lateness: HdrHistogram, sends: int) -> bool:
    """Whether the generator fell behind its schedule: over BEHIND_SHARE of the sends left
    BEHIND_US or more after their slot (a few microseconds late is the machine's noise and is
    counted in late_sends; this is the one that moves the figures)."""
    if not sends:
        return False
    above = sum(n for value, n in iterate(lateness) if value >= BEHIND_US)
    return above > BEHIND_SHARE * sends


def iterate(hist: HdrHistogram) -> list[tuple[int, int]]:
    """(value, count) of every recorded bucket."""
    return [
        (int(v.value_iterated_to), int(v.count_at_value_iterated_to))
        for v in hist.get_recorded_iterator()
    ]


def latency_fields(
    corrected: HdrHistogram,
    uncorrected: HdrHistogram | None,
    lateness: HdrHistogram | None,
    sends: int,
) -> dict[str, Any]:
    """The latency part of a summary, one run's or merged: the spectra and the histograms
    (``uncorrected`` and ``lateness`` are the open loop's, None for a closed loop)."""
    return {
        "latency_us": spectrum(corrected),
        "latency_uncorrected_us": spectrum(uncorrected) if uncorrected else None,
        "latency_resolution_us": 1,
        "latency_significant_digits": DIGITS,
        "send_lateness_us": spectrum(lateness) if lateness else None,
        "generator_behind": behind(lateness, sends) if lateness else False,
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected) if uncorrected else None,
        "histogram_lateness": encode(lateness) if lateness else None,
        "_histogram": corrected,
    }


def flow_fields(
    rate: float, size: int, requests: int, errors: int, mismatches: int,
    corrected: HdrHistogram, uncorrected: HdrHistogram,
) -> dict[str, Any]:  # fmt: skip
    """The latency-under-load flow's figures (``under_load``), one run's or merged."""
    return {
        "rate": rate,
        "size": size,
        "requests": requests,
        "errors": errors,
        "mismatches": mismatches,
        "latency_us": spectrum(corrected),
        "latency_uncorrected_us": spectrum(uncorrected),
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected),
    }


def summarize(cfg: BenchConfig, results: list[WorkerResult]) -> dict[str, Any]:
    """One run's summary, from what each worker process brought back."""
    from socket_echo.tools.bench.advice import explain_losses

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
    measured = [r for r in results if r.measured_from]
    start = min((r.measured_from for r in measured), default=0.0)
    elapsed = max((r.elapsed for r in results), default=0.0) or 1e-9
    requests = sum(r.requests for r in results)
    if requests == 0 and not errors:
        errors["no request was answered"] += 1
    cpu = sum(r.cpu_seconds for r in results)
    spun = sum(r.spun_seconds for r in results)
    busiest = max(
        ((r.cpu_seconds - r.spun_seconds) / r.elapsed for r in results if r.elapsed), default=0.0
    )  # polling for the next slot is CPU kept on purpose, not load
    sends = sum(r.sends for r in results)
    late_sends = sum(r.late_sends for r in results)
    lost = sum(r.lost for r in results)
    connections, rate = cfg.share
    open_loop = bool(cfg.rate) and cfg.mode == "pingpong"
    summary: dict[str, Any] = {
        "format": FORMAT,
        "target": cfg.target.url,
        "mode": cfg.mode,
        "requests": requests,
        "requests_per_second": requests / elapsed,
        "megabytes_per_second": sum(r.bytes for r in results) / elapsed / 1e6,
        "latency_from": "intended send time (corrected)" if open_loop else "send",
        **latency_fields(
            corrected,
            uncorrected if open_loop else None,
            histogram(lateness) if open_loop else None,
            sends,
        ),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "mismatches": sum(r.mismatches for r in results),
        "lost_datagrams": lost,
        "late_datagrams": sum(r.late for r in results),
        "duplicate_datagrams": sum(r.duplicates for r in results),
        "sends": sends,
        "late_sends": late_sends,
        "held_sends": sum(r.held_sends for r in results),
        "late_send_threshold_us": LATE_SEND_US,
        "client_cpu_percent": 100 * cpu / elapsed / max(1, len(results)),  # per process
        "client_spin_percent": 100 * spun / elapsed / max(1, len(results)),  # of that, polling
        "client_saturated": busiest >= SATURATED,
        "window": {"start": start, "end": start + elapsed, "seconds": elapsed},
        "segment": {"index": cfg.segment[0], "count": cfg.segment[1]},
        "parameters": {
            "connections": connections,
            "size": cfg.size,
            "duration": cfg.duration,
            "processes": cfg.processes,
            "rate": rate or None,
            "timeout": cfg.timeout,
            "arrival": cfg.arrival if open_loop else None,
            "warmup": cfg.warmup,
            "in_flight": cfg.in_flight if open_loop else 1,
            "start_at": cfg.start_at,
            "segment": f"{cfg.segment[0]}/{cfg.segment[1]}",
        },
        "per_second": [
            {"t": start + i, "requests": sum(s.values()), "histogram": encode(histogram(s))}
            for i, s in enumerate(seconds)
        ],
    }
    summary["loss_explanation"] = explain_losses(cfg, requests, lost, elapsed)
    summary["under_load"] = under_load(cfg, probes) if cfg.probe_rate else None
    return summary


def under_load(cfg: BenchConfig, probes: list[WorkerResult]) -> dict[str, Any]:
    """The ping-pong flow measured while the load ran (iperf2's --bounceback-congest)."""
    corrected, uncorrected = histogram(), histogram()
    for r in probes:
        corrected.add(histogram(r.latency_us))
        uncorrected.add(histogram(r.uncorrected_us))
    return flow_fields(
        cfg.probe_rate,
        cfg.probe().size,
        sum(r.requests for r in probes),
        sum(sum(r.errors.values()) for r in probes),
        sum(r.mismatches for r in probes),
        corrected,
        uncorrected,
    )


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=2)


# -- report: results added ------------------------------------------------------------------
SAME = ("target", "mode")  # results of different targets, modes or sizes do not add


def merge(results: list[ResultFile]) -> dict[str, Any]:
    """Results added: histograms added, counters and rates summed, the window the common one.
    ResultError when they are not of one target, mode and size, or one segment comes twice.

    Memory: one decoded histogram per figure, plus one at a time for the seconds (each
    second's histograms decoded, added, encoded and dropped in turn); the files' encoded text
    is all that stays (merging four one-hour results: see the README's figures)."""
    first = results[0]
    for r in results[1:]:
        for key in SAME:
            if getattr(r, key) != getattr(first, key):
                raise ResultError(
                    f"{r.path}: {key} {getattr(r, key)!r}, not {getattr(first, key)!r} as in "
                    f"{first.path}: results of different runs do not add"
                )
        if r.parameters["size"] != first.parameters["size"]:
            raise ResultError(
                f"{r.path}: size {r.parameters['size']}, not {first.parameters['size']} as in "
                f"{first.path}"
            )
        if r.segment[1] != first.segment[1]:
            raise ResultError(
                f"{r.path}: segment {r.segment[0]}/{r.segment[1]}, of another division than "
                f"{first.path}'s {first.segment[0]}/{first.segment[1]}"
            )
    seen: dict[tuple[int, int], str] = {}
    for r in results:
        if r.segment in seen and r.segment[1] > 1:
            raise ResultError(
                f"{r.path}: segment {r.segment[0]}/{r.segment[1]} is also {seen[r.segment]}"
            )
        seen[r.segment] = r.path
    corrected, uncorrected, lateness = histogram(), histogram(), histogram()
    open_loop = False
    seconds: defaultdict[int, list[Second]] = defaultdict(list)
    errors: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    rates: Counter[str] = Counter()
    for r in results:
        add_encoded(corrected, r.histogram, f"{r.path}: histogram")
        if r.histogram_uncorrected:
            open_loop = True
            add_encoded(uncorrected, r.histogram_uncorrected, f"{r.path}: histogram_uncorrected")
        if r.histogram_lateness:
            add_encoded(lateness, r.histogram_lateness, f"{r.path}: histogram_lateness")
        for s in r.per_second:
            seconds[round(s.t)].append(s)
        counts.update(r.counts)
        rates.update(r.rates)
        errors.update(r.error_kinds)
    start = max(r.window_start for r in results)
    end = min(r.window_start + r.window_seconds for r in results)
    params = dict(first.parameters)
    for key in ("connections", "processes"):
        params[key] = sum(r.parameters[key] for r in results)
    all_rates = [r.parameters["rate"] for r in results]
    params["rate"] = sum(all_rates) if all(all_rates) else None
    params["segment"] = ",".join(sorted(r.parameters["segment"] for r in results))
    sends = counts["sends"]
    merged: dict[str, Any] = {
        "format": FORMAT,
        "target": first.target,
        "mode": first.mode,
        "requests": counts["requests"],
        "requests_per_second": rates["requests_per_second"],
        "megabytes_per_second": rates["megabytes_per_second"],
        "latency_from": first.latency_from,
        **latency_fields(
            corrected,
            uncorrected if open_loop else None,
            lateness if open_loop else None,
            sends,
        ),
        "errors": counts["errors"],
        "error_kinds": dict(errors),
        **{k: counts[k] for k in COUNTS if k not in ("requests", "errors")},
        "late_send_threshold_us": first.late_send_threshold_us or LATE_SEND_US,
        "client_cpu_percent": max(r.client_cpu_percent for r in results),  # per process
        "client_spin_percent": max(r.client_spin_percent for r in results),
        "client_saturated": any(r.client_saturated for r in results),
        "window": {"start": start, "end": end, "seconds": max(0.0, end - start)},
        "segment": {"index": None, "count": first.segment[1], "merged": sorted(i for i, _ in seen)},
        "parameters": params,
        "per_second": [merge_second(t, seconds.pop(t)) for t in sorted(seconds)],
        "loss_explanation": None,
        "under_load": merge_flows([r for r in results if r.under_load]),
    }
    return merged


def merge_second(t: int, parts: list[Second]) -> dict[str, Any]:
    """One second of the merge: its histograms added into one, encoded, and let go."""
    hist = histogram()
    for s in parts:
        add_encoded(hist, s.histogram, f"per_second {t}")
    return {"t": float(t), "requests": sum(s.requests for s in parts), "histogram": encode(hist)}


def merge_flows(results: list[ResultFile]) -> dict[str, Any] | None:
    flows = [r.under_load for r in results if r.under_load]
    if not flows:
        return None
    corrected, uncorrected = histogram(), histogram()
    for r, flow in zip(results, flows, strict=True):
        add_encoded(corrected, flow.histogram, f"{r.path}: under_load.histogram")
        add_encoded(uncorrected, flow.histogram_uncorrected, f"{r.path}: under_load")
    return flow_fields(
        sum(f.rate for f in flows),
        flows[0].size,
        sum(f.requests for f in flows),
        sum(f.errors for f in flows),
        sum(f.mismatches for f in flows),
        corrected,
        uncorrected,
    )


def coverage_note(merged: dict[str, Any]) -> str | None:
    """What the merge lacks or where the windows differ, in one line (None: nothing)."""
    count = merged["segment"]["count"]
    have = merged["segment"]["merged"]
    missing = count - len(have) if count > 1 else 0
    notes = []
    if missing:
        notes.append(f"{missing} of {count} segments are missing: {spans(have, count)}")
    seconds = merged["window"]["seconds"]
    if not math.isfinite(seconds) or seconds < 0.9 * float(merged["parameters"]["duration"]):
        notes.append(
            f"the runs overlap for {max(0.0, seconds):.1f} s of {merged['parameters']['duration']}"
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
