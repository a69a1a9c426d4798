"""bench's figures: the workers' counts made into one summary (the JSON ``--json`` writes and
the table shows), and summaries of several runs added into one (``socket-echo report``).

Latency is kept as HdrHistogram keeps it (1 us to an hour, 3 significant digits: exact to the
microsecond below 1 ms, within 0.1 % above), and the JSON carries the histograms themselves,
HdrHistogram V2-encoded (base64), for the whole window and for each second of it: adding
histograms is exact, so N segments merged are one run, not an average of percentiles.
"""

from __future__ import annotations

import binascii
import json
import math
import zlib
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

from socket_echo.tools.bench_model import BenchConfig, WorkerResult
from socket_echo.tools.defaults import BEHIND_SHARE, BEHIND_US, LATE_SEND_US

LOWEST_US, HIGHEST_US, DIGITS = 1, 3_600_000_000, 3
PERCENTILES = {
    "p50": 50.0, "p75": 75.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9,
    "p9999": 99.99, "p99999": 99.999,
}  # fmt: skip
SATURATED = 0.90  # a worker busier than this measured itself, not the server
FORMAT = "socket-echo bench 2"  # the JSON's "format": what report reads


class ResultError(ValueError):
    """A results file report cannot read, or results that cannot be added; one line."""


def histogram(counts: Counter[int] | None = None) -> HdrHistogram:
    hist = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
    for us, n in (counts or {}).items():
        hist.record_value(min(max(LOWEST_US, us), HIGHEST_US), n)
    return hist


def encode(hist: HdrHistogram) -> str:
    return str(hist.encode().decode("ascii"))


def decode(text: str, where: str) -> HdrHistogram:
    try:
        hist = HdrHistogram.decode(text.encode("ascii"))
    except (ValueError, TypeError, UnicodeError, binascii.Error, zlib.error, IndexError) as exc:
        raise ResultError(f"{where}: not an HdrHistogram ({exc})") from None
    out = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
    out.add(hist)
    return out


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


def summarize(cfg: BenchConfig, results: list[WorkerResult]) -> dict[str, Any]:
    """One run's summary, from what each worker process brought back."""
    from socket_echo.tools.advice import explain_losses

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
        "latency_us": spectrum(corrected),
        "latency_from": "intended send time (corrected)" if open_loop else "send",
        "latency_uncorrected_us": spectrum(uncorrected) if open_loop else None,
        "latency_resolution_us": 1,
        "latency_significant_digits": DIGITS,
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
        "send_lateness_us": spectrum(histogram(lateness)) if open_loop else None,
        "generator_behind": behind(histogram(lateness), sends),
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
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected) if open_loop else None,
        "histogram_lateness": encode(histogram(lateness)) if open_loop else None,
        "per_second": [
            {"t": start + i, "requests": sum(s.values()), "histogram": encode(histogram(s))}
            for i, s in enumerate(seconds)
        ],
        "_histogram": corrected,
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
    return {
        "rate": cfg.probe_rate,
        "size": cfg.probe().size,
        "requests": sum(r.requests for r in probes),
        "errors": sum(sum(r.errors.values()) for r in probes),
        "mismatches": sum(r.mismatches for r in probes),
        "latency_us": spectrum(corrected),
        "latency_uncorrected_us": spectrum(uncorrected),
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected),
    }


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=2)


# -- report: results added ------------------------------------------------------------------
SAME = ("target", "mode")  # results of different targets, modes or sizes do not add


def load(path: str) -> dict[str, Any]:
    """One results file, checked enough to be added; ResultError (one line) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ResultError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeError) as exc:
        raise ResultError(
            f"{path}: not a bench result (malformed or truncated JSON: {exc})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultError(f'{path}: not a bench result of this version (no "format": "{FORMAT}")')
    try:
        for key in ("target", "mode", "requests", "histogram", "window", "parameters", "segment"):
            data[key]
        float(data["window"]["start"]) + float(data["window"]["seconds"])
        int(data["parameters"]["size"]) + int(data["parameters"]["connections"])
        data["_histogram"] = decode(data["histogram"], path)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ResultError):
            raise
        raise ResultError(f"{path}: a bench result without {exc}") from None
    data["_path"] = path
    return data


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Results added: histograms added, counters and rates summed, the window the common one.
    ResultError when they are not of one target, mode and size, or one segment comes twice."""
    first = results[0]
    for r in results[1:]:
        for key in SAME:
            if r[key] != first[key]:
                raise ResultError(
                    f"{r['_path']}: {key} {r[key]!r}, not {first[key]!r} as in {first['_path']}: "
                    "results of different runs do not add"
                )
        if r["parameters"]["size"] != first["parameters"]["size"]:
            raise ResultError(
                f"{r['_path']}: size {r['parameters']['size']}, not "
                f"{first['parameters']['size']} as in {first['_path']}"
            )
    seen: dict[tuple[int, int], str] = {}
    for r in results:
        seg = (int(r["segment"]["index"]), int(r["segment"]["count"]))
        if seg in seen and seg[1] > 1:
            raise ResultError(f"{r['_path']}: segment {seg[0]}/{seg[1]} is also {seen[seg]}")
        seen[seg] = r["_path"]
    corrected = histogram()
    uncorrected = histogram()
    lateness = histogram()
    any_uncorrected = False
    seconds: dict[int, tuple[int, HdrHistogram]] = {}
    for r in results:
        corrected.add(r["_histogram"])
        if r.get("histogram_uncorrected"):
            any_uncorrected = True
            uncorrected.add(decode(r["histogram_uncorrected"], r["_path"]))
        if r.get("histogram_lateness"):
            lateness.add(decode(r["histogram_lateness"], r["_path"]))
        for s in r.get("per_second") or []:
            t = round(float(s["t"]))
            n, h = seconds.get(t, (0, histogram()))
            h.add(decode(s["histogram"], r["_path"]))
            seconds[t] = (n + int(s["requests"]), h)
    start = max(float(r["window"]["start"]) for r in results)
    end = min(float(r["window"]["start"]) + float(r["window"]["seconds"]) for r in results)

    def total(key: str) -> Any:
        return sum(r.get(key) or 0 for r in results)

    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.get("error_kinds") or {})
    params = dict(first["parameters"])
    for key in ("connections", "processes"):
        params[key] = sum(int(r["parameters"].get(key) or 0) for r in results)
    rates = [r["parameters"].get("rate") for r in results]
    params["rate"] = sum(rates) if all(rates) else None
    params["segment"] = ",".join(sorted(r["parameters"].get("segment", "0/1") for r in results))
    sends, late_sends = total("sends"), total("late_sends")
    merged: dict[str, Any] = {
        "format": FORMAT,
        "target": first["target"],
        "mode": first["mode"],
        "requests": total("requests"),
        "requests_per_second": total("requests_per_second"),
        "megabytes_per_second": total("megabytes_per_second"),
        "latency_us": spectrum(corrected),
        "latency_from": first.get("latency_from", "send"),
        "latency_uncorrected_us": spectrum(uncorrected) if any_uncorrected else None,
        "latency_resolution_us": 1,
        "latency_significant_digits": DIGITS,
        "errors": total("errors"),
        "error_kinds": dict(errors),
        "mismatches": total("mismatches"),
        "lost_datagrams": total("lost_datagrams"),
        "late_datagrams": total("late_datagrams"),
        "duplicate_datagrams": total("duplicate_datagrams"),
        "sends": sends,
        "late_sends": late_sends,
        "held_sends": total("held_sends"),
        "late_send_threshold_us": first.get("late_send_threshold_us", LATE_SEND_US),
        "send_lateness_us": spectrum(lateness) if any_uncorrected else None,
        "generator_behind": behind(lateness, sends),
        "client_cpu_percent": max(float(r.get("client_cpu_percent") or 0) for r in results),
        "client_saturated": any(r.get("client_saturated") for r in results),
        "window": {"start": start, "end": end, "seconds": max(0.0, end - start)},
        "segment": {
            "index": None,
            "count": int(first["segment"]["count"]),
            "merged": sorted(i for i, _ in seen),
        },
        "parameters": params,
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected) if any_uncorrected else None,
        "histogram_lateness": encode(lateness) if any_uncorrected else None,
        "per_second": [
            {"t": float(t), "requests": n, "histogram": encode(h)}
            for t, (n, h) in sorted(seconds.items())
        ],
        "loss_explanation": None,
        "under_load": merge_under_load(results),
        "_histogram": corrected,
    }
    return merged


def merge_under_load(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    flows = [r["under_load"] for r in results if r.get("under_load")]
    if not flows:
        return None
    corrected, uncorrected = histogram(), histogram()
    for f in flows:
        corrected.add(decode(f["histogram"], "under_load"))
        uncorrected.add(decode(f["histogram_uncorrected"], "under_load"))
    return {
        "rate": sum(f["rate"] for f in flows),
        "size": flows[0]["size"],
        "requests": sum(f["requests"] for f in flows),
        "errors": sum(f["errors"] for f in flows),
        "mismatches": sum(f["mismatches"] for f in flows),
        "latency_us": spectrum(corrected),
        "latency_uncorrected_us": spectrum(uncorrected),
        "histogram": encode(corrected),
        "histogram_uncorrected": encode(uncorrected),
    }


def coverage_note(merged: dict[str, Any]) -> str | None:
    """What the merge lacks or where the windows differ, in one line (None: nothing)."""
    count = merged["segment"]["count"]
    have = merged["segment"]["merged"]
    missing = [i for i in range(count) if i not in have] if count > 1 else []
    notes = []
    if missing:
        notes.append(f"segments {', '.join(map(str, missing))} of {count} are missing")
    seconds = merged["window"]["seconds"]
    if not math.isfinite(seconds) or seconds < 0.9 * float(merged["parameters"]["duration"]):
        notes.append(
            f"the runs overlap for {max(0.0, seconds):.1f} s of {merged['parameters']['duration']}"
            " (start them together: --start-at)"
        )
    return "; ".join(notes) or None
